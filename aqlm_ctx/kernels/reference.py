"""Plain-torch AQLM math: the dequantized weight and the matmul every kernel must agree with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dequantize_weight", "reference_matmul"]


def dequantize_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The dense ``[out_features, in_features]`` weight that a QuantizedLinear's tensors encode.

    ``W[o*og + a, i*ig + b] = scales[o] * sum_c codebooks[c, codes[o, i, c] mod 2**nbits, a, b]``.

    Args:
        codes: ``[out_groups, in_groups, num_codebooks]`` int8/int16 (unsigned values stored signed).
        codebooks: ``[num_codebooks, codebook_size, out_group_size, in_group_size]``.
        scales: ``[out_groups, 1, 1, 1]``.
    """
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    out_groups, in_groups, _ = codes.shape
    # Unsigned values in int32 (codebook sizes are powers of two: 2**nbits); cheaper than int64 and embedding_bag.
    indices = codes.to(torch.int32) & (codebook_size - 1)
    vectors = codebooks.reshape(num_codebooks, codebook_size, -1)
    groups = F.embedding(indices[..., 0], vectors[0])  # a fresh tensor: updated in place below, autograd allows it
    for c in range(1, num_codebooks):
        groups += F.embedding(indices[..., c], vectors[c])
    groups = groups.view(out_groups, in_groups, out_group_size, in_group_size).mul_(scales)
    return groups.transpose(1, 2).reshape(out_groups * out_group_size, in_groups * in_group_size)


def reference_matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` with ``W`` dequantized in plain torch, in the input's dtype; differentiable in input,
    codebooks, scales and bias."""
    weight = dequantize_weight(codes, codebooks, scales).to(input.dtype)
    return F.linear(input, weight, None if bias is None else bias.to(input.dtype))

"""Utilities for tests, examples and benchmarks: random but well-scaled AQLM tensors for any skeleton."""

from __future__ import annotations

import math

import torch
from aqlm import QuantizedLinear
from torch import nn

__all__ = ["random_tensors"]


def random_tensors(model: nn.Module, seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint-style tensors for every parameter and persistent buffer of ``model`` (tied ones once).

    Quantized layers get uniformly random codes and codebooks scaled so that each dequantized weight has a standard
    deviation of about ``1/sqrt(in_features)``; dense 1-D weights are ones, biases zeros, other weights small
    Gaussians. Feed the result to :func:`aqlm_ctx.load_tensors` or save it as a checkpoint.

    Args:
        model: a skeleton (on meta or not).
        seed: makes the tensors reproducible.
        dtype: dtype of floating tensors; default: the dtype each tensor has in ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {id(layer.codes): layer for layer in model.modules() if isinstance(layer, QuantizedLinear)}
    codebook_owner = {id(layer.codebooks): layer for layer in layers.values()}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        float_dtype = dtype or (tensor.dtype if tensor.is_floating_point() else torch.float32)
        if id(tensor) in layers:
            nbits = layers[id(tensor)].nbits_per_codebook
            half = 2 ** (nbits - 1)
            value = torch.randint(-half, half, tuple(tensor.shape), generator=generator).to(tensor.dtype)
        elif id(tensor) in codebook_owner:
            layer = codebook_owner[id(tensor)]
            std = 1.0 / math.sqrt(layer.in_features * layer.num_codebooks)
            value = (torch.randn(tuple(tensor.shape), generator=generator) * std).to(float_dtype)
        elif not tensor.is_floating_point():
            value = torch.zeros(tuple(tensor.shape), dtype=tensor.dtype)
        elif name.endswith("scales"):
            value = (1 + 0.1 * torch.rand(tuple(tensor.shape), generator=generator)).to(float_dtype)
        elif name.endswith("bias"):
            value = torch.zeros(tuple(tensor.shape), dtype=float_dtype)
        elif tensor.dim() == 1:
            value = torch.ones(tuple(tensor.shape), dtype=float_dtype)
        else:
            value = (torch.randn(tuple(tensor.shape), generator=generator) * 0.02).to(float_dtype)
        tensors[name] = value
    return tensors

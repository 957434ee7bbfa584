"""CUDA kernels for AQLM layers, written in Triton.

Covered: in_group_size 8, out_group_size 1, codebooks 2x8 (2 codebooks of 256), 1x8 and 1x16 (1 codebook of
65536), fp16 or bf16 inputs and codebooks, on GPUs of compute capability 8.0 or newer. Everything else makes
:func:`supports` return False, and the dispatcher falls back to aqlm's stock kernels.

The matmul is the custom op ``torch.ops.aqlm_ctx.aqlm_matmul`` (with a fake implementation), so ``torch.compile``
treats it as one opaque node and CUDA-graph capture sees a single kernel launch per layer.

This module imports without triton or CUDA; the kernels themselves live in :mod:`.triton_aqlm` and load on first
use.
"""

import functools
import importlib.util

import torch

from .ops import MATMUL_SCHEMA, define

__all__ = ["SUPPORTED_FORMATS", "matmul", "supports"]

# (num_codebooks, codebook_size) -> codes dtype, for in_group_size 8 and out_group_size 1.
SUPPORTED_FORMATS: dict[tuple[int, int], torch.dtype] = {
    (2, 256): torch.int8,
    (1, 256): torch.int8,
    (1, 65536): torch.int16,
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16)
# (num_codebooks, codebook_size) -> inclusive token range where our kernels measured faster than aqlm's stock
# CUDA kernels on an H200 (BENCHMARKS.md, "GPU kernels"). Outside it supports() declines and the dispatcher uses
# the stock kernels; matmul() itself is correct for any token count and format above.
TOKEN_RANGES: dict[tuple[int, int], tuple[int, int]] = {
    (2, 256): (1, 0),  # empty: stock 2x8 was faster everywhere we measured
    (1, 256): (7, 64),  # stock's dequantize path (>6 tokens) is slow for 1x8
    (1, 65536): (2, 64),  # at 1 token stock's matvec was as fast or faster on some layers (cuda_kernels.py)
}


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def supports(input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """Whether :func:`matmul` should handle this call: CUDA tensors of a covered format, triton installed, and
    a token count where our kernels beat aqlm's stock ones (:data:`TOKEN_RANGES`; :func:`matmul` itself is
    correct for any count)."""
    if not (input.is_cuda and codes.is_cuda and codebooks.is_cuda):
        return False
    if input.device != codes.device or input.device != codebooks.device:
        return False
    if input.dtype not in _FLOAT_DTYPES or codebooks.dtype not in _FLOAT_DTYPES:
        return False
    if codebooks.dim() != 4 or codes.dim() != 3:
        return False
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    if (out_group_size, in_group_size) != (1, 8):
        return False
    if SUPPORTED_FORMATS.get((num_codebooks, codebook_size)) != codes.dtype:
        return False
    if codes.shape[2] != num_codebooks or input.dim() < 1 or input.shape[-1] != codes.shape[1] * in_group_size:
        return False
    low, high = TOKEN_RANGES[(num_codebooks, codebook_size)]
    tokens = input.numel() // max(1, input.shape[-1])
    if not low <= tokens <= high:
        return False
    if not _triton_available():
        return False
    index = input.device.index if input.device.index is not None else torch.cuda.current_device()
    return _capability_ok(index)


def _aqlm_matmul_cuda(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    from . import triton_aqlm

    return triton_aqlm.launch(input, codes, codebooks, scales, bias)


def _aqlm_matmul_fake(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], codes.shape[0] * codebooks.shape[2]))


_aqlm_matmul = define("aqlm_matmul", MATMUL_SCHEMA, _aqlm_matmul_cuda, _aqlm_matmul_fake)


def matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` on the GPU, for a layer that :func:`supports` accepts. Codes are only read."""
    return _aqlm_matmul(input, codes, codebooks, scales, bias)

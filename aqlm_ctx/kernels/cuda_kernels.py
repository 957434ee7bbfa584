"""CUDA C++ decode kernels for 2x8 and 1x8 AQLM layers (in_group_size 8, out_group_size 1), 1 to 32 tokens.

The kernels (``csrc/aqlm_decode.cu``, shipped with the package) keep the codebooks in shared memory, replicated 8
times so that 16-byte reads never conflict, stream the codes with 16-byte loads, decode each 8-weight group once
into tensor-core operands that serve every token of the call, and fuse scales and bias; split-K with a
deterministic reduction fills the GPU when a layer has few output rows. They are compiled on first use with
``torch.utils.cpp_extension.load`` (nvcc and ninja needed; build cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). When the build fails, :func:`supports` answers False from then on and a warning is
issued once, so the dispatcher falls back to the Triton or stock kernels.

Codes are read in the checkpoint layout ``[out_features, in_features / 8, num_codebooks]``; no copy is kept.
Split-K uses one int32 ticket counter per block of 256 output rows and device; launches of these kernels on two
streams of one device at the same time could share counters, so run them on one stream per device.

The matmul is the custom op ``torch.ops.aqlm_ctx.aqlm_decode`` (with a fake implementation) so that
``torch.compile`` sees one opaque node and CUDA graphs capture one launch per layer.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from types import ModuleType
from typing import NamedTuple

import torch

__all__ = ["MAX_TOKENS", "TOKEN_RANGES", "Plan", "build", "launch", "matmul", "plan", "supports"]

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
MAX_TOKENS = 32
ROWS_PER_CTA = 256  # kRowsPerCta in csrc/aqlm_decode.h
# num_codebooks -> inclusive token range where these kernels measured faster than aqlm's stock kernels and our
# Triton kernels on an H100 (BENCHMARKS.md, "GPU kernels"). supports() declines outside it.
TOKEN_RANGES: dict[int, tuple[int, int]] = {2: (1, 32), 1: (1, 32)}
X_WINDOW_BYTES = 40 * 1024  # shared memory for x per CTA: with 64 KiB of 2x8 codebooks, two CTAs fit an SM
CTAS_PER_SM = 2  # split-K aims at this many CTAs per SM (best of the split counts swept on an H200 and an H100)
MAX_COUNTERS = 1 << 16

_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType | None] = {}
_COUNTERS: dict[int, torch.Tensor] = {}


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def build(device: torch.device) -> ModuleType | None:
    """The compiled extension for ``device``'s architecture, built on first call; None (and one warning) if it
    cannot be built here.

    Example:
        >>> build(torch.device("cuda")).decode  # doctest: +SKIP
    """
    arch = _arch(device)
    with _LOCK:
        if arch not in _MODULES:
            try:
                from torch.utils.cpp_extension import load

                _MODULES[arch] = load(
                    name=f"aqlm_ctx_decode_sm{arch}",
                    sources=[os.path.join(CSRC, "aqlm_decode.cpp"), os.path.join(CSRC, "aqlm_decode.cu")],
                    extra_include_paths=[CSRC],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
                )
            except Exception as exc:  # no nvcc/ninja, compiler error: fall back to Triton or stock, once, loudly
                _MODULES[arch] = None
                warnings.warn(
                    f"aqlm_ctx: CUDA decode kernels could not be built ({type(exc).__name__}: {exc}); "
                    "using the Triton or stock aqlm kernels instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _MODULES[arch]


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _build_failed(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False  # no build while tracing: the op itself builds, and falls back if that fails
    return build(device) is None


def supports(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> bool:
    """Whether :func:`matmul` should handle this call: a 2x8 or 1x8 layer (in_group_size 8, out_group_size 1) on
    one CUDA device of compute capability 8.0+, codebooks, scales and bias in the input's dtype (fp16 or bf16),
    codes contiguous with rows of a multiple of 16 bytes, a token count in :data:`TOKEN_RANGES`, and an extension
    that builds (the first call builds it).

    Example:
        >>> supports(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    device = input.device
    if device.type != "cuda" or any(t.device != device for t in (codes, codebooks, scales)):
        return False
    if input.dtype not in (torch.float16, torch.bfloat16) or input.dim() < 1:
        return False
    if codebooks.dtype != input.dtype or scales.dtype != input.dtype or scales.numel() != codes.shape[0]:
        return False
    if bias is not None and (bias.dtype != input.dtype or bias.device != device):
        return False
    if codebooks.dim() != 4 or codes.dim() != 3 or codes.dtype != torch.int8:
        return False
    num_codebooks = codebooks.shape[0]
    if num_codebooks not in TOKEN_RANGES or tuple(codebooks.shape[1:]) != (256, 1, 8):
        return False
    out_groups, groups, code_columns = codes.shape
    if code_columns != num_codebooks or input.shape[-1] != groups * 8 or (groups * num_codebooks) % 16:
        return False
    if not codes.is_contiguous() or codes.data_ptr() % 16 or out_groups > MAX_COUNTERS * ROWS_PER_CTA:
        return False
    low, high = TOKEN_RANGES[num_codebooks]
    if not low <= input.numel() // max(1, input.shape[-1]) <= high:
        return False
    return _capability_ok(_index(device)) and not _build_failed(device)


class Plan(NamedTuple):
    """Launch shape: split-K count, input groups per split, groups of x staged in shared memory at a time."""

    splits: int
    groups_per_split: int
    window_groups: int


def plan(tokens: int, out_features: int, groups: int, num_codebooks: int, sm_count: int, splits: int = 0) -> Plan:
    """Split-K and x-window sizes: about :data:`CTAS_PER_SM` CTAs per SM unless ``splits`` is given (at most one
    split per superstep of 32 or 64 groups); the largest x window within :data:`X_WINDOW_BYTES`.

    Example:
        >>> plan(1, 8192, 3584, 2, 132)  # doctest: +SKIP
    """
    superstep = 64 // num_codebooks
    steps = -(-groups // superstep)
    row_blocks = -(-out_features // ROWS_PER_CTA)
    if splits <= 0:
        splits = round(CTAS_PER_SM * sm_count / row_blocks)
    groups_per_split = -(-steps // max(1, min(splits, steps))) * superstep
    splits = -(-groups // groups_per_split)
    window = max(superstep, X_WINDOW_BYTES // (tokens * 18) // superstep * superstep)
    return Plan(splits, groups_per_split, min(window, groups_per_split))


def _counters(device: torch.device) -> torch.Tensor:
    """Per-device ticket counters for split-K (all zero between launches: the last CTA resets its own)."""
    index = _index(device)
    cnt = _COUNTERS.get(index)
    if cnt is None:
        cnt = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
        if torch.cuda.is_current_stream_capturing():
            return cnt  # belongs to the graph being captured (zeroed at each replay): not kept
        _COUNTERS[index] = cnt
    return cnt


def launch(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    splits: int = 0,
) -> torch.Tensor:
    """``input @ W.T + bias`` with the CUDA decode kernel (``splits`` > 0 forces the split-K count).

    Raises:
        RuntimeError: the extension cannot be built here.
        ValueError: more than :data:`MAX_TOKENS` tokens.

    Example:
        >>> launch(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    module = build(input.device)
    if module is None:
        raise RuntimeError("aqlm_ctx CUDA decode kernels are not available (build failed)")
    out_features, groups, num_codebooks = codes.shape
    lead = input.shape[:-1]
    x = input.reshape(-1, groups * 8)
    if x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    tokens = x.shape[0]
    if tokens > MAX_TOKENS:
        raise ValueError(f"the CUDA decode kernel takes at most {MAX_TOKENS} tokens, got {tokens}")
    if tokens == 0:
        return input.new_empty((*lead, out_features))
    n_splits, groups_per_split, window = plan(
        tokens, out_features, groups, num_codebooks, _sm_count(_index(input.device)), splits
    )
    counters = _counters(input.device) if n_splits > 1 else x
    y = module.decode(
        x,
        codes,
        codebooks.contiguous(),
        scales.reshape(-1).contiguous(),
        None if bias is None else bias.contiguous(),
        counters,
        n_splits,
        groups_per_split,
        window,
    )
    return y.view(*lead, out_features)


@torch.library.custom_op("aqlm_ctx::aqlm_decode", mutates_args=(), device_types="cuda")
def _aqlm_decode_op(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    if build(input.device) is None:  # only reachable when the first call was traced by torch.compile
        from . import triton_kernels
        from .dispatch import _stock_cuda_matmul

        if triton_kernels.supports(input, codes, codebooks):
            return triton_kernels.matmul(input, codes, codebooks, scales, bias)
        return _stock_cuda_matmul(input, codes, codebooks, scales, bias)
    with torch.cuda.device(input.device):
        return launch(input, codes, codebooks, scales, bias)


@_aqlm_decode_op.register_fake
def _aqlm_decode_fake(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], codes.shape[0]))


def matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` on the GPU for a layer :func:`supports` accepts (custom op). Codes are only read.

    Example:
        >>> y = matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    return torch.ops.aqlm_ctx.aqlm_decode(input, codes, codebooks, scales, bias)

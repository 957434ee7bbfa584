"""CUDA C++ kernels for AQLM layers (in_group_size 8, out_group_size 1): decode (2x8 and 1x8, 1 to 32 tokens),
prefill (2x8 and 1x8, many tokens, Hopper) and a dequantizer (2x8, 1x8, 1x16) for dequantize-then-cuBLAS.

The decode kernels (``csrc/aqlm_decode.cu``, shipped with the package) keep the codebooks in shared memory, replicated 8
times so that 16-byte reads never conflict, stream the codes with 16-byte loads, decode each 8-weight group once
into tensor-core operands that serve every token of the call, and fuse scales and bias; split-K with a
deterministic reduction fills the GPU when a layer has few output rows. The prefill kernel (``csrc/aqlm_prefill.cu``,
sm_90a) decodes the same way straight into the register operand of ``wgmma`` (the weight) and streams tiles of up
to 256 tokens through shared memory as the other operand, so the weight is never written out. The kernels are
compiled on first use with
``torch.utils.cpp_extension.load`` (nvcc and ninja needed; build cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). When the build fails, :func:`supports` answers False from then on and a warning is
issued once, so the dispatcher falls back to the Triton or stock kernels.

Codes are read in the checkpoint layout ``[out_features, in_features / 8, num_codebooks]``; no copy is kept.
Split-K uses one int32 ticket counter per block of 256 output rows and device; launches of these kernels on two
streams of one device at the same time could share counters, so run them on one stream per device.

The matmuls are the custom ops ``torch.ops.aqlm_ctx.aqlm_decode`` and ``aqlm_prefill``, and the dequantizer is
``aqlm_dequantize`` (each with a fake implementation), so that ``torch.compile`` sees opaque nodes and CUDA graphs
capture one launch per layer (two for dequantize-then-cuBLAS).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "DEQUANTIZED_TOKEN_RANGES",
    "MAX_TOKENS",
    "PREFILL_TOKEN_RANGES",
    "TOKEN_RANGES",
    "Plan",
    "PrefillPlan",
    "build",
    "dequantize",
    "dequantized_matmul",
    "launch",
    "launch_prefill",
    "matmul",
    "plan",
    "plan_prefill",
    "prefill_preferred",
    "prefill_matmul",
    "supports",
    "supports_dequantized",
    "supports_prefill",
]

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
MAX_TOKENS = 32
ROWS_PER_CTA = 256  # kRowsPerCta in csrc/aqlm_decode.h
# num_codebooks -> inclusive token range where these kernels measured faster than aqlm's stock kernels and our
# Triton kernels on an H100 (BENCHMARKS.md, "GPU kernels"). supports() declines outside it.
TOKEN_RANGES: dict[int, tuple[int, int]] = {2: (1, 32), 1: (1, 32)}
X_WINDOW_BYTES = 40 * 1024  # shared memory for x per CTA: with 64 KiB of 2x8 codebooks, two CTAs fit an SM
CTAS_PER_SM = 2  # split-K aims at this many CTAs per SM (best of the split counts swept on an H200 and an H100)
MAX_COUNTERS = 1 << 16
PREFILL_ROWS = 128  # kPrefillRows in csrc/aqlm_prefill.h
PREFILL_TILES = (64, 128, 256)  # token tiles of the prefill kernel
# num_codebooks -> inclusive token range of the prefill kernel; above PREFILL_SMALL_TOKENS it is used only for layers
# of at least PREFILL_LARGE_WEIGHTS weights. Measured on an H200 (BENCHMARKS.md, "GPU kernels"): it beats stock and
# dequantize-then-cuBLAS at 64 tokens (except 4096x4096) and, on 8192x28672 / 28672x8192, at 128; at 512 tokens
# dequantize-then-cuBLAS is faster everywhere.
PREFILL_TOKEN_RANGES: dict[int, tuple[int, int]] = {2: (33, 128), 1: (33, 128)}
PREFILL_SMALL_TOKENS = 64
PREFILL_LARGE_WEIGHTS = 1 << 26
# (num_codebooks, codebook_size) -> inclusive token range where dequantizing with our kernel and calling cuBLAS
# measured faster than stock aqlm (and, for 1x16 from 64 tokens, than our Triton kernel); for 2x8 and 1x8 the
# dispatcher asks the decode and prefill kernels first.
DEQUANTIZED_TOKEN_RANGES: dict[tuple[int, int], tuple[int, int]] = {
    (2, 256): (33, 1 << 30),
    (1, 256): (33, 1 << 30),
    (1, 65536): (64, 1 << 30),
}

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

                target = "90a" if arch == "90" else arch  # wgmma needs the arch-specific Hopper target
                _MODULES[arch] = load(
                    name=f"aqlm_ctx_cuda_sm{target}",
                    sources=[
                        os.path.join(CSRC, name) for name in ("aqlm_decode.cpp", "aqlm_decode.cu", "aqlm_prefill.cu")
                    ],
                    extra_include_paths=[CSRC],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{target},code=sm_{target}"],
                )
            except Exception as exc:  # no nvcc/ninja, compiler error: fall back to Triton or stock, once, loudly
                _MODULES[arch] = None
                warnings.warn(
                    f"aqlm_ctx: CUDA kernels could not be built ({type(exc).__name__}: {exc}); "
                    "using the Triton or stock aqlm kernels instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _MODULES[arch]


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _build_failed(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False  # no build while tracing: the op itself builds, and falls back if that fails
    return build(device) is None


def _tokens(input: torch.Tensor) -> int:
    return input.numel() // max(1, input.shape[-1])


def _covered(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> bool:
    """Checks shared by every route: one CUDA device, fp16/bf16 input with codebooks, scales and bias in its dtype,
    in_group_size 8, out_group_size 1, codes contiguous in the checkpoint layout."""
    device = input.device
    if device.type != "cuda" or any(t.device != device for t in (codes, codebooks, scales)):
        return False
    if input.dtype not in (torch.float16, torch.bfloat16) or input.dim() < 1:
        return False
    if codebooks.dtype != input.dtype or scales.dtype != input.dtype or scales.numel() != codes.shape[0]:
        return False
    if bias is not None and (bias.dtype != input.dtype or bias.device != device):
        return False
    if codebooks.dim() != 4 or codes.dim() != 3 or tuple(codebooks.shape[2:]) != (1, 8):
        return False
    _, groups, code_columns = codes.shape
    if code_columns != codebooks.shape[0] or input.shape[-1] != groups * 8 or not codes.is_contiguous():
        return False
    return _capability_ok(_index(device))


def _eight_bit(codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """2x8 or 1x8 with code rows of a multiple of 16 bytes, 16-byte aligned."""
    num_codebooks = codebooks.shape[0]
    if num_codebooks not in (1, 2) or codebooks.shape[1] != 256 or codes.dtype != torch.int8:
        return False
    return (codes.shape[1] * num_codebooks) % 16 == 0 and codes.data_ptr() % 16 == 0


def supports(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> bool:
    """Whether :func:`matmul` (decode) should handle this call: a 2x8 or 1x8 layer (in_group_size 8, out_group_size
    1) on one CUDA device of compute capability 8.0+, codebooks, scales and bias in the input's dtype (fp16 or bf16),
    codes contiguous with rows of a multiple of 16 bytes, a token count in :data:`TOKEN_RANGES`, and an extension
    that builds (the first call builds it).

    Example:
        >>> supports(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    if not _covered(input, codes, codebooks, scales, bias) or not _eight_bit(codes, codebooks):
        return False
    low, high = TOKEN_RANGES[codebooks.shape[0]]
    if not low <= _tokens(input) <= high or codes.shape[0] > MAX_COUNTERS * ROWS_PER_CTA:
        return False
    return not _build_failed(input.device)


def supports_prefill(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> bool:
    """Whether :func:`prefill_matmul` should handle this call: as :func:`supports`, on a Hopper GPU (compute
    capability 9.0), in_features a multiple of 64, and :func:`prefill_preferred` for the token count and layer size.

    Example:
        >>> supports_prefill(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    if not _covered(input, codes, codebooks, scales, bias) or not _eight_bit(codes, codebooks):
        return False
    tokens = _tokens(input)
    if not prefill_preferred(codebooks.shape[0], tokens, codes.shape[0], input.shape[-1]):
        return False
    if codes.shape[1] % 8 or not _hopper(_index(input.device)):
        return False
    return not _build_failed(input.device)


def prefill_preferred(num_codebooks: int, tokens: int, out_features: int, in_features: int) -> bool:
    """Whether the prefill kernel is the route for this many tokens and this layer size (else dequantize-then-cuBLAS).

    Example:
        >>> prefill_preferred(2, 100, 8192, 28672), prefill_preferred(2, 100, 4096, 4096)
        (True, False)
    """
    low, high = PREFILL_TOKEN_RANGES[num_codebooks]
    if not low <= tokens <= high:
        return False
    return tokens <= PREFILL_SMALL_TOKENS or out_features * in_features >= PREFILL_LARGE_WEIGHTS


def supports_dequantized(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> bool:
    """Whether :func:`dequantized_matmul` should handle this call: a 2x8, 1x8 or 1x16 layer covered as in
    :func:`supports` and a token count in :data:`DEQUANTIZED_TOKEN_RANGES`.

    Example:
        >>> supports_dequantized(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    if not _covered(input, codes, codebooks, scales, bias):
        return False
    key = (codebooks.shape[0], codebooks.shape[1])
    if key not in DEQUANTIZED_TOKEN_RANGES or codes.dtype != (torch.int16 if key[1] == 65536 else torch.int8):
        return False
    low, high = DEQUANTIZED_TOKEN_RANGES[key]
    return low <= _tokens(input) <= high and not _build_failed(input.device)


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
        raise RuntimeError("aqlm_ctx CUDA kernels are not available (build failed)")
    out_features, groups, num_codebooks = codes.shape
    lead = input.shape[:-1]
    x = _flat_input(input, groups * 8)
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
        return _fallback(input, codes, codebooks, scales, bias)
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


class PrefillPlan(NamedTuple):
    """Prefill launch shape: tokens per CTA, split-K count, 64-feature stages per split."""

    token_tile: int
    splits: int
    stages_per_split: int


def plan_prefill(
    tokens: int, out_features: int, groups: int, sm_count: int, token_tile: int = 0, splits: int = 0
) -> PrefillPlan:
    """Token tile (the smallest of :data:`PREFILL_TILES` holding all tokens, at most 256) and split-K count (about
    one CTA per SM when the row x token tiles are fewer) unless given.

    Example:
        >>> plan_prefill(512, 4096, 512, 132)
        PrefillPlan(token_tile=256, splits=2, stages_per_split=32)
    """
    if token_tile <= 0:
        token_tile = next((t for t in PREFILL_TILES if tokens <= t), PREFILL_TILES[-1])
    tiles = -(-out_features // PREFILL_ROWS) * -(-tokens // token_tile)
    stages = groups // 8
    if splits <= 0:
        splits = max(1, round(sm_count / tiles))
    stages_per_split = -(-stages // max(1, min(splits, stages)))
    return PrefillPlan(token_tile, -(-stages // stages_per_split), stages_per_split)


def _flat_input(input: torch.Tensor, in_features: int) -> torch.Tensor:
    """``input`` as [tokens, in_features] with unit inner stride, rows 16-byte aligned (copied only if not)."""
    x = input.reshape(-1, in_features)
    if x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    return x


def launch_prefill(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    token_tile: int = 0,
    splits: int = 0,
) -> torch.Tensor:
    """``input @ W.T + bias`` with the prefill kernel (``token_tile`` / ``splits`` > 0 force the plan).

    Raises:
        RuntimeError: the extension cannot be built here.

    Example:
        >>> launch_prefill(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    module = build(input.device)
    if module is None:
        raise RuntimeError("aqlm_ctx CUDA kernels are not available (build failed)")
    out_features, groups, _ = codes.shape
    lead = input.shape[:-1]
    x = _flat_input(input, groups * 8)
    if x.shape[0] == 0:
        return input.new_empty((*lead, out_features))
    tile, n_splits, per_split = plan_prefill(
        x.shape[0], out_features, groups, _sm_count(_index(input.device)), token_tile, splits
    )
    y = module.prefill(
        x,
        codes,
        codebooks.contiguous(),
        scales.reshape(-1).contiguous(),
        None if bias is None else bias.contiguous(),
        _counters(input.device) if n_splits > 1 else x,
        tile,
        n_splits,
        per_split,
    )
    return y.view(*lead, out_features)


def _fallback(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Triton or stock aqlm, for a custom op traced by torch.compile whose extension then failed to build."""
    from . import triton_kernels
    from .dispatch import _stock_cuda_matmul

    if triton_kernels.supports(input, codes, codebooks):
        return triton_kernels.matmul(input, codes, codebooks, scales, bias)
    return _stock_cuda_matmul(input, codes, codebooks, scales, bias)


@torch.library.custom_op("aqlm_ctx::aqlm_prefill", mutates_args=(), device_types="cuda")
def _aqlm_prefill_op(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    if build(input.device) is None:  # only reachable when the first call was traced by torch.compile
        return _fallback(input, codes, codebooks, scales, bias)
    with torch.cuda.device(input.device):
        return launch_prefill(input, codes, codebooks, scales, bias)


@_aqlm_prefill_op.register_fake
def _aqlm_prefill_fake(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], codes.shape[0]))


def prefill_matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` for a layer :func:`supports_prefill` accepts (custom op). Codes are only read.

    Example:
        >>> y = prefill_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    return torch.ops.aqlm_ctx.aqlm_prefill(input, codes, codebooks, scales, bias)


@torch.library.custom_op("aqlm_ctx::aqlm_dequantize", mutates_args=(), device_types="cuda")
def _aqlm_dequantize_op(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    module = build(codes.device)
    if module is None:  # only reachable when the first call was traced by torch.compile
        from .reference import dequantize_weight

        return dequantize_weight(codes, codebooks, scales).to(codebooks.dtype)
    with torch.cuda.device(codes.device):
        return module.dequantize(codes, codebooks.contiguous(), scales.reshape(-1).contiguous())


@_aqlm_dequantize_op.register_fake
def _aqlm_dequantize_fake(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codebooks.new_empty((codes.shape[0], codes.shape[1] * 8))


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The dense weight ``[out_features, in_features]`` (codebooks' dtype, scales applied) on the GPU (custom op).

    Example:
        >>> w = dequantize(layer.codes, layer.codebooks, layer.scales)  # doctest: +SKIP
    """
    return torch.ops.aqlm_ctx.aqlm_dequantize(codes, codebooks, scales)


def dequantized_matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` by dequantizing ``W`` into a scratch matrix and calling cuBLAS (``F.linear``).

    Example:
        >>> y = dequantized_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    return F.linear(input, dequantize(codes, codebooks, scales), bias)

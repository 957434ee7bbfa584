"""CUDA C++ kernels for AQLM layers (in_group_size 8, out_group_size 1): decode (2x8, 1x8 and 1x16, 1 to 32 tokens),
prefill (2x8 and 1x8, many tokens, Hopper) and a dequantizer (2x8, 1x8, 1x16) for dequantize-then-cuBLAS.

The 2x8 / 1x8 decode kernel (``csrc/aqlm_decode.cu``, shipped with the package) keeps the codebooks in shared memory,
replicated 8 times so that 16-byte reads never conflict, streams the codes with 16-byte loads, decodes each 8-weight
group once into tensor-core operands that serve every token of the call, and fuses scales and bias. When a layer has
few blocks of output rows, split-K fills the GPU, or stream-K (CTAs whose shares of the work span row blocks) where
split-K would leave SMs idle; either way a deterministic reduction sums the partials (:func:`plan`). The 1x16
decode kernel (same file) has the same structure, but its 1 MiB codebook does not fit in shared memory: each group
is one random 16-byte read through L1 / L2, many of them kept in flight per thread, on persistent CTAs
(:func:`plan_1x16`). The prefill kernel
(``csrc/aqlm_prefill.cu``, sm_90a) decodes the same way straight into the register operand of ``wgmma`` (the
weight) and streams tiles of up to 256 tokens through shared memory as the other operand, so the weight is never
written out; split-K covers every tile of a small launch or only the tiles after the last whole wave of CTAs, and a
second kernel sums the partials (:func:`plan_prefill`). The kernels are compiled on first use with
``torch.utils.cpp_extension.load`` (nvcc and ninja needed; build cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). When the build fails, the ``supports*`` functions answer False from then on and a
warning is issued once, so the dispatcher falls back to the Triton or stock kernels.

Codes are read in the checkpoint layout ``[out_features, in_features / 8, num_codebooks]``; no copy is kept.
The decode kernels' split-K uses one int32 ticket counter per block of output rows and device; launches of these
kernels on two streams of one device at the same time could share counters, so run them on one stream per device.

The matmuls are the custom ops ``torch.ops.aqlm_ctx.aqlm_decode``, ``aqlm_decode_1x16`` and ``aqlm_prefill``, and the
dequantizer is ``aqlm_dequantize`` (each with a fake implementation), so that ``torch.compile`` sees opaque nodes and
CUDA graphs capture each layer's launches (two where a second kernel sums split-K partials, and for
dequantize-then-cuBLAS).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .dispatch import _triton_or_stock_matmul
from .ops import MATMUL_SCHEMA, define

__all__ = [
    "DECODE_1X16_TOKEN_RANGE",
    "DEQUANTIZED_TOKEN_RANGES",
    "GATHER_CLUSTER",
    "GATHER_L1",
    "GATHER_L2",
    "GATHER_SHARED",
    "MAX_TOKENS",
    "PREFILL_TOKEN_RANGES",
    "TOKEN_RANGES",
    "Plan",
    "Plan1x16",
    "PrefillPlan",
    "build",
    "dequantize",
    "dequantized_matmul",
    "launch",
    "launch_1x16",
    "launch_prefill",
    "matmul",
    "matmul_1x16",
    "plan",
    "plan_1x16",
    "plan_prefill",
    "prefill_preferred",
    "prefill_matmul",
    "supports",
    "supports_1x16",
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
MAX_CLUSTER = 8  # kMaxCluster in csrc/aqlm_decode.h: the most CTAs of a portable thread-block cluster
# Where the planner makes split-K CTAs a thread-block cluster that sums its partials in distributed shared memory:
# 9-32 tokens on layers of at most CLUSTER_MAX_GROUPS input groups, with CLUSTER_SPLITS splits or SMs / row blocks +
# 1 if fewer, but not below 4 (14336x4096's 3 uneven splits were 5% slower). Fitted to split sweeps on an H100
# (BENCHMARKS.md, "GPU kernels", seventh session): 2x8 4096x4096 at 16 tokens 19.4 -> 12.9 us, at 32 31.9 -> 17.2;
# 4096x11008 36.5 -> 25.1 and 66.8 -> 35.4; slower at 1-4 tokens and on 8192x28672, so not used there.
CLUSTER_TOKENS = (9, 32)
CLUSTER_MAX_GROUPS = 11008 // 8
CLUSTER_SPLITS = 6
# From this many tokens on, partials that no cluster sums are summed by a second kernel, one thread per output, instead
# of by the last CTA of each row block, which alone sums tokens x 256 outputs at the end of the decode kernel (H100, 16
# tokens, 8192x28672: 2x8 71 -> 65-66 us, 1x8 53 -> 47-48; BENCHMARKS.md, "GPU kernels", eighth session).
SUM_KERNEL_TOKENS = 9
MAX_COUNTERS = 1 << 16
PREFILL_ROWS = 128  # kPrefillRows in csrc/aqlm_prefill.h
PREFILL_TILES = (64, 128, 256)  # token tiles of the prefill kernel
PREFILL_MAX_SPLITS = 8
# The planner's cost model (_prefill_cost_us): µs per 64-feature stage of a CTA alone on its SM, per token tile, and
# of each of two 64-token CTAs sharing one (fitted to a tile/split sweep on an H200); the split-K partials' write +
# read bandwidth (bytes per µs) and a cost per split and token of the tile (fitted to the tile/split/whole-tile sweep
# of 2x8 at 128, 512 and 1024 tokens on an H100 once a second kernel summed the partials: the plan it picks is the
# fastest or within 3% of it on each of the 15 cases; BENCHMARKS.md, "Prefill").
PREFILL_STAGE_US = {64: 0.62, 128: 0.73, 256: 0.93}
PREFILL_SHARED_US = 1.04
PREFILL_PARTIAL_BYTES_PER_US = 2.5e6
PREFILL_SPLIT_US = 0.01
# num_codebooks -> inclusive token range of the prefill kernel; above PREFILL_SMALL_TOKENS it is used only for layers
# of at least PREFILL_LARGE_WEIGHTS weights. Measured on an H200 and an H100 (BENCHMARKS.md, "Prefill"): up to 128
# tokens it beats dequantize-then-cuBLAS (4096x4096 at 128 within a few %); on 8192x28672 and 28672x8192 it wins at
# 512 tokens and loses at 2048 (1024, between them, was not measured); at 512 tokens dequantize-then-cuBLAS is faster
# on the smaller layers.
PREFILL_TOKEN_RANGES: dict[int, tuple[int, int]] = {2: (33, 1024), 1: (33, 1024)}
PREFILL_SMALL_TOKENS = 128
PREFILL_LARGE_WEIGHTS = 1 << 26
# (num_codebooks, codebook_size) -> inclusive token range where dequantizing with our kernel and calling cuBLAS
# measured faster than stock aqlm (and, for 1x16 from 64 tokens, than our Triton kernel); for 2x8 and 1x8 the
# dispatcher asks the decode and prefill kernels first.
DEQUANTIZED_TOKEN_RANGES: dict[tuple[int, int], tuple[int, int]] = {
    (2, 256): (33, 1 << 30),
    (1, 256): (33, 1 << 30),
    (1, 65536): (64, 1 << 30),
}

# 1x16 decode kernel. Inclusive token range where it is used (BENCHMARKS.md, "1x16 decode (CUDA)", H100): from 2
# tokens on it was faster than stock and Triton everywhere. At 1 token it takes only the large layers (sm_90+, at
# least CLUSTER_1X16_MIN_GROUPS codes: 8192x28672 204 vs 272 us for stock on an H100, 202 vs 232 on an H200); on
# smaller layers both it and stock's one-warp-per-row matvec are bound by the L2 gathers and came out even or stock
# ahead on the H100 (4096x11008 54.7 vs 51.2 us, 6144x4096 34.1 vs 31.4 us), so the dispatcher gives them to stock.
# supports_1x16() declines outside that.
DECODE_1X16_TOKEN_RANGE = (2, 32)
# How it reads codebook entries (Gather1x16 in csrc/aqlm_decode.h): through L1, from L2 only, the first entries from
# a copy in shared memory (as many as fit) and the rest from L2, or (sm_90+) the first 2 x ~14 K entries from the
# shared memory of a two-CTA cluster and the rest through L1. The first three ran at about the same rate on an H100
# (within 2-5%, L1 best or close to best); the cluster's copies take ~40% of the reads off L2 and made 1-4 tokens on
# layers of at least CLUSTER_1X16_MIN_GROUPS codes 6-16% faster there (8192x28672 at 1 token 235 -> 203 us), but
# their staging costs a few us and they lost on smaller layers and from 8 tokens on (BENCHMARKS.md, "1x16 decode").
# They pay only where L2 is the tighter bound: on an H200 (60 MiB of L2 against the H100's 50, so more L2 slices) the
# L1 gathers alone ran 13-15% faster than on the H100 and the cluster lost or tied (28672x8192 at 1 token 213 vs
# 232 us, 8192x28672 202 vs 201; BENCHMARKS.md, eleventh session), so clusters are planned only up to
# CLUSTER_1X16_MAX_L2_BYTES of L2.
GATHER_L1, GATHER_L2, GATHER_SHARED, GATHER_CLUSTER = 0, 1, 2, 3
GATHER_1X16 = GATHER_L1  # the planner's default, except where it clusters
CLUSTER_1X16 = 2  # kCluster1x16 in csrc/aqlm_decode.h: CTAs per cluster with GATHER_CLUSTER
CLUSTER_1X16_TOKENS = 4
CLUSTER_1X16_MIN_GROUPS = 1 << 24
CLUSTER_1X16_MAX_L2_BYTES = 50 << 20
WARPS_1X16 = 8  # warps per CTA (16 output rows each) unless a shared-memory cache (16 warps, one CTA per SM)
MAX_WARPS_1X16 = 16  # kMaxWarps1x16 in csrc/aqlm_decode.h
X_WINDOW_BYTES_1X16 = 16 * 1024  # shared memory for x per CTA (8 KiB with a cache, where the rest is codebook)
TILE_OVERHEAD_STEPS = 1  # the planner's fixed cost of a (row block, split) tile, in 32-group supersteps

_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType | None] = {}
_COUNTERS: dict[int, torch.Tensor] = {}


def _arch(device: torch.device) -> str:
    return _arch_of(_index(device))


@functools.cache
def _arch_of(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
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
def _clusters(index: int) -> bool:
    """Whether this GPU runs thread-block clusters (sm_90+): split-K sums in a cluster (1x16's GATHER_CLUSTER:
    :func:`_clusters_1x16`)."""
    return torch.cuda.get_device_capability(index) >= (9, 0)


@functools.cache
def _clusters_1x16(index: int) -> bool:
    """Whether the 1x16 kernel may read from a cluster's shared-memory codebook copies here: sm_90+ with at most
    :data:`CLUSTER_1X16_MAX_L2_BYTES` of L2 (with more, L2 serves the gathers faster than the copies)."""
    return _clusters(index) and torch.cuda.get_device_properties(index).L2_cache_size <= CLUSTER_1X16_MAX_L2_BYTES


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


def supports_1x16(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> bool:
    """Whether :func:`matmul_1x16` should handle this call: a 1x16 layer (one codebook of 65536 entries, int16 codes,
    in_group_size 8, out_group_size 1) covered as in :func:`supports`, in_features a multiple of 64 (code rows of a
    multiple of 16 bytes), a token count in :data:`DECODE_1X16_TOKEN_RANGE` or one token on a large layer (sm_90+, at
    least :data:`CLUSTER_1X16_MIN_GROUPS` codes), and an extension that builds.

    Example:
        >>> supports_1x16(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    if not _covered(input, codes, codebooks, scales, bias):
        return False
    if tuple(codebooks.shape[:2]) != (1, 65536) or codes.dtype != torch.int16:
        return False
    if codes.shape[1] % 8 or codes.data_ptr() % 16 or codes.shape[0] > MAX_COUNTERS * 16:
        return False
    tokens = _tokens(input)
    low, high = DECODE_1X16_TOKEN_RANGE
    large = tokens == 1 and _clusters(_index(input.device)) and _large_1x16(codes.shape[0], codes.shape[1])
    return (low <= tokens <= high or large) and not _build_failed(input.device)


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
        >>> prefill_preferred(2, 512, 8192, 28672), prefill_preferred(2, 512, 4096, 4096)
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
    """Launch shape of the 2x8 / 1x8 decode kernel: CTAs, input groups per split (split-K; 0: stream-K), groups of x
    staged in shared memory at a time, CTAs per thread-block cluster (split-K: a row block's splits sum their partials
    through distributed shared memory; 1: through the workspace), and whether a second kernel sums the workspace's
    partials (else the last CTA of each row block)."""

    ctas: int
    groups_per_split: int
    window_groups: int
    cluster: int = 1
    sum_kernel: bool = False


@functools.lru_cache(maxsize=4096)  # called on every decode launch; pure function of its arguments
def plan(
    tokens: int,
    out_features: int,
    groups: int,
    num_codebooks: int,
    sm_count: int,
    splits: int = 0,
    ctas: int = 0,
    clusters: bool = False,
) -> Plan:
    """Grid and x-window sizes. Work units are supersteps (32 or 64 groups) of one block of :data:`ROWS_PER_CTA`
    rows. Split-K gives each row block about :data:`CTAS_PER_SM` x SMs / row blocks CTAs of whole supersteps
    (``splits`` forces the count); stream-K spreads all units evenly over :data:`CTAS_PER_SM` x SMs CTAs (``ctas``
    forces the count), a CTA's share may span row blocks. Stream-K is used when it gives the busiest CTA fewer units.
    The x window is the largest within :data:`X_WINDOW_BYTES`, at most one CTA's share. With ``clusters`` (sm_90+),
    a row block's splits form one thread-block cluster when there are 2 to :data:`MAX_CLUSTER` of them: forced by
    ``splits``, or planned as :data:`CLUSTER_TOKENS` and :data:`CLUSTER_SPLITS` say where split-K is the plan.
    Unclustered partials are summed by a second kernel from :data:`SUM_KERNEL_TOKENS` tokens on.

    Example:
        >>> plan(1, 28672, 1024, 2, 132)  # 112 row blocks: split-K would give 2 CTAs of 16 supersteps per row block
        Plan(ctas=264, groups_per_split=0, window_groups=448, cluster=1, sum_kernel=False)
    """
    superstep = 64 // num_codebooks
    steps = -(-groups // superstep)
    row_blocks = -(-out_features // ROWS_PER_CTA)
    units = row_blocks * steps
    window = max(superstep, X_WINDOW_BYTES // (tokens * 18) // superstep * superstep)
    stream_ctas = max(1, min(ctas if ctas > 0 else CTAS_PER_SM * sm_count, units))
    split_count = splits if splits > 0 else round(CTAS_PER_SM * sm_count / row_blocks)
    split_steps = -(-steps // max(1, min(split_count, steps)))
    sum_kernel = tokens >= SUM_KERNEL_TOKENS
    if ctas > 0 or (splits <= 0 and -(-units // stream_ctas) < split_steps):
        return Plan(stream_ctas, 0, min(window, -(-units // stream_ctas) * superstep), 1, sum_kernel)
    low, high = CLUSTER_TOKENS
    cluster_splits = min(CLUSTER_SPLITS, sm_count // row_blocks + 1)
    planned = splits <= 0 and low <= tokens <= high and groups <= CLUSTER_MAX_GROUPS and cluster_splits >= 4
    if clusters and planned:
        split_steps = -(-steps // min(cluster_splits, steps))
    count = -(-steps // split_steps)
    cluster = count if clusters and (planned or splits > 0) and 1 < count <= MAX_CLUSTER else 1
    per_split = split_steps * superstep
    return Plan(row_blocks * count, per_split, min(window, per_split), cluster, sum_kernel and cluster == 1)


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


def _module(device: torch.device) -> ModuleType:
    module = build(device)
    if module is None:
        raise RuntimeError("aqlm_ctx CUDA kernels are not available (build failed)")
    return module


def _counters_or(x: torch.Tensor, splits: int) -> torch.Tensor:
    """The split-K ticket counters of x's device, or (unused without split-K) x itself."""
    return _counters(x.device) if splits > 1 else x


def _launch(
    run: Callable[..., torch.Tensor],
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    max_tokens: int | None,
) -> torch.Tensor:
    """What every launcher does around its kernel: ``input`` as ``[tokens, in_features]`` (at most ``max_tokens``),
    no launch for no tokens, the layer's tensors as the kernels take them, and the output in ``input``'s shape.
    ``run(module, x, codes, codebooks, scales, bias)`` plans and launches.
    """
    module = _module(input.device)
    out_features, groups, _ = codes.shape
    lead = input.shape[:-1]
    x = _flat_input(input, groups * 8)
    if max_tokens is not None and x.shape[0] > max_tokens:
        raise ValueError(f"the CUDA decode kernel takes at most {max_tokens} tokens, got {x.shape[0]}")
    if x.shape[0] == 0:
        return input.new_empty((*lead, out_features))
    contiguous_bias = None if bias is None else bias.contiguous()
    y = run(module, x, codes, codebooks.contiguous(), scales.reshape(-1).contiguous(), contiguous_bias)
    return y.view(*lead, out_features)


def launch(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    splits: int = 0,
    ctas: int = 0,
    clusters: bool | None = None,
    sum_kernel: bool | None = None,
) -> torch.Tensor:
    """``input @ W.T + bias`` with the 2x8 / 1x8 CUDA decode kernel (``splits`` CTAs per row block or ``ctas`` in all
    force the grid, ``clusters`` whether split-K CTAs form thread-block clusters, by default where the GPU can,
    ``sum_kernel`` whether a second kernel sums the partials: :func:`plan`).

    Raises:
        RuntimeError: the extension cannot be built here.
        ValueError: more than :data:`MAX_TOKENS` tokens.

    Example:
        >>> launch(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """

    def run(module: ModuleType, x: torch.Tensor, *layer: torch.Tensor | None) -> torch.Tensor:
        out_features, groups, num_codebooks = codes.shape
        index = _index(x.device)
        cluster = _clusters(index) if clusters is None else clusters and _clusters(index)
        p = plan(x.shape[0], out_features, groups, num_codebooks, _sm_count(index), splits, ctas, cluster)
        summed = p.sum_kernel if sum_kernel is None else sum_kernel
        return module.decode(
            x, *layer, _counters(x.device), p.ctas, p.groups_per_split, p.window_groups, p.cluster, summed
        )

    return _launch(run, input, codes, codebooks, scales, bias, MAX_TOKENS)


class Plan1x16(NamedTuple):
    """1x16 launch shape: split-K count, input groups per split, groups of x staged at a time, warps per CTA (16 rows
    each), persistent CTAs, gather mode, codebook entries cached in shared memory, shared-memory carveout (%)."""

    splits: int
    groups_per_split: int
    window_groups: int
    warps: int
    grid: int
    gather: int
    cache_entries: int
    carveout: int


def _large_1x16(out_features: int, groups: int) -> bool:
    """Whether a 1x16 layer is large (:data:`CLUSTER_1X16_MIN_GROUPS` codes or more): our kernel takes it at one token
    (sm_90+), and a cluster's codebook copies pay there (:func:`_clusters_1x16`)."""
    return out_features * groups >= CLUSTER_1X16_MIN_GROUPS


def _x_slots_1x16(window_groups: int) -> int:
    """decode_x_slots(8, window) in csrc/aqlm_decode.h: 9 slots per 8 groups, padded to 4 mod 8."""
    slots = window_groups + window_groups // 8
    return slots + (4 - slots) % 8


@functools.lru_cache(maxsize=4096)  # called on every decode launch; pure function of its arguments
def plan_1x16(
    tokens: int,
    out_features: int,
    groups: int,
    sm_count: int,
    splits: int = 0,
    gather: int = -1,
    warps: int = 0,
    shared_per_cta: int = 227 * 1024,
    shared_per_sm: int = 228 * 1024,
    max_entries: int = 0,
    clusters: bool = False,
) -> Plan1x16:
    """Launch shape of the 1x16 kernel. ``gather`` and ``warps`` (default :data:`WARPS_1X16`, 16 with
    ``GATHER_SHARED`` or ``GATHER_CLUSTER``) unless given; ``gather`` defaults to ``GATHER_CLUSTER`` with ``clusters``
    (sm_90+) for at most :data:`CLUSTER_1X16_TOKENS` tokens on layers of at least :data:`CLUSTER_1X16_MIN_GROUPS`
    codes, else :data:`GATHER_1X16`. CTAs hold up to 128 registers a thread, so ``16 // warps`` of them fit an SM
    (one with a shared-memory cache), and the grid is that many per SM, persistent (whole clusters).
    Unless ``splits`` is given, there is no split-K when the row blocks alone give every SM a CTA (measured best at
    16 and 32 tokens on 28672x8192, where the fp32 partials cost most); otherwise the split-K count minimises the
    busiest SM's work, ``ceil(tiles / sm_count)`` tiles of ``groups_per_split / 32 + TILE_OVERHEAD_STEPS``
    supersteps, up to half as much again when the tiles leave CTA slots empty (fewer warps to overlap the codebook
    reads). The x window is the largest within
    :data:`X_WINDOW_BYTES_1X16` (8 KiB with a shared-memory cache, which holds as many codebook entries as then fit
    in ``shared_per_cta``, at most ``max_entries`` if given).

    Example:
        >>> plan_1x16(1, 8192, 3584, 132)  # doctest: +SKIP
    """
    if gather < 0:
        clustered = clusters and _large_1x16(out_features, groups) and tokens <= CLUSTER_1X16_TOKENS
        gather = GATHER_CLUSTER if clustered else GATHER_1X16
    clustered = gather == GATHER_CLUSTER
    shared = gather == GATHER_SHARED or clustered
    if warps <= 0:
        warps = MAX_WARPS_1X16 if shared else WARPS_1X16
    ctas_per_sm = 1 if shared else max(1, MAX_WARPS_1X16 // warps)
    row_blocks = -(-out_features // (16 * warps))
    steps = -(-groups // 32)
    slots = ctas_per_sm * sm_count
    if splits <= 0 and row_blocks >= sm_count:
        splits = 1
    elif splits <= 0:
        best = (float("inf"), 1)
        for candidate in range(1, min(steps, 64) + 1):
            per_split = -(-steps // candidate)
            tiles = row_blocks * -(-steps // per_split)
            load = -(-tiles // sm_count) * (per_split + TILE_OVERHEAD_STEPS)
            best = min(best, (load * (1.5 - 0.5 * min(tiles, slots) / slots), candidate))
        splits = best[1]
    groups_per_split = -(-steps // max(1, min(splits, steps))) * 32
    splits = -(-groups // groups_per_split)
    budget = X_WINDOW_BYTES_1X16 // 2 if shared else X_WINDOW_BYTES_1X16
    window = min(max(32, budget // (tokens * 18) // 32 * 32), groups_per_split)
    x_bytes = tokens * _x_slots_1x16(window) * 16
    cache_entries = 0
    carveout = 100
    if shared:
        cache_entries = min(65536 // (CLUSTER_1X16 if clustered else 1), (shared_per_cta - x_bytes - 1024) // 16)
        cache_entries = max(0, min(cache_entries, max_entries or cache_entries) // 256 * 256)
    else:
        carveout = min(100, -(-ctas_per_sm * (x_bytes + 1024) * 100 // shared_per_sm))
    grid = min(row_blocks * splits, slots)
    if clustered:  # whole clusters
        grid = max(CLUSTER_1X16, min(-(-grid // CLUSTER_1X16), slots // CLUSTER_1X16) * CLUSTER_1X16)
    return Plan1x16(splits, groups_per_split, window, warps, grid, gather, cache_entries, carveout)


@functools.cache
def _shared_memory(index: int) -> tuple[int, int]:
    """Opt-in shared memory per CTA and shared memory per SM, in bytes."""
    props = torch.cuda.get_device_properties(index)
    per_cta = int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))
    per_sm = int(getattr(props, "shared_memory_per_multiprocessor", per_cta + 1024))
    return per_cta, per_sm


def launch_1x16(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    splits: int = 0,
    gather: int = -1,
    warps: int = 0,
    max_entries: int = 0,
) -> torch.Tensor:
    """``input @ W.T + bias`` with the 1x16 CUDA decode kernel (``splits``, ``gather``, ``warps``, ``max_entries``
    force the plan: :func:`plan_1x16`).

    Raises:
        RuntimeError: the extension cannot be built here.
        ValueError: more than :data:`MAX_TOKENS` tokens.

    Example:
        >>> launch_1x16(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """

    def run(module: ModuleType, x: torch.Tensor, *layer: torch.Tensor | None) -> torch.Tensor:
        index = _index(x.device)
        out_features, groups, _ = codes.shape
        sm_count, shared, clusters = _sm_count(index), _shared_memory(index), _clusters_1x16(index)
        p = plan_1x16(x.shape[0], out_features, groups, sm_count, splits, gather, warps, *shared, max_entries, clusters)
        return module.decode_1x16(
            x,
            *layer,
            _counters_or(x, p.splits),
            p.splits,
            p.groups_per_split,
            p.window_groups,
            p.warps,
            p.grid,
            p.gather,
            p.cache_entries,
            p.carveout,
        )

    return _launch(run, input, codes, codebooks, scales, bias, MAX_TOKENS)


class PrefillPlan(NamedTuple):
    """Prefill launch shape: tokens per CTA, split-K count, 64-feature stages per split, and the tiles (128 rows x
    ``token_tile`` tokens, numbered row block first) that take one CTA each; the tiles after them are split."""

    token_tile: int
    splits: int
    stages_per_split: int
    whole_tiles: int


def _prefill_wave(tile: int, sm_count: int) -> int:
    """CTAs of the prefill kernel that run at once: one per SM, two 64-token CTAs sharing one."""
    return 2 * sm_count if tile == 64 else sm_count


def _prefill_cost_us(
    tokens: int, out_features: int, stages: int, sm_count: int, tile: int, splits: int, whole_tiles: int
) -> float:
    """Estimated µs of a prefill launch: for the whole tiles' CTAs, then the split tiles' CTAs, waves x stages per CTA
    x a stage's time; plus the split-K traffic.

    The stage times (one CTA per SM; two 64-token CTAs share an SM), the partials' bandwidth and the per-split cost are
    fitted to the prefill kernel's sweeps (:data:`PREFILL_STAGE_US` and below; BENCHMARKS.md, "Prefill").
    """
    tiles = -(-out_features // PREFILL_ROWS) * -(-tokens // tile)

    def waves_us(ctas: int, stages_each: int) -> float:
        stage_us = PREFILL_SHARED_US if tile == 64 and ctas > sm_count else PREFILL_STAGE_US[tile]
        return -(-ctas // _prefill_wave(tile, sm_count)) * stages_each * stage_us

    split_tiles = tiles - whole_tiles
    cost = waves_us(whole_tiles, stages) + waves_us(split_tiles * splits, -(-stages // splits))
    if splits > 1 and split_tiles:
        outputs = tokens * out_features * split_tiles / tiles
        cost += splits * outputs * 8 / PREFILL_PARTIAL_BYTES_PER_US + PREFILL_SPLIT_US * tile * splits
    return cost


@functools.lru_cache(maxsize=4096)  # called on every prefill launch; pure function of its arguments
def plan_prefill(
    tokens: int,
    out_features: int,
    groups: int,
    sm_count: int,
    token_tile: int = 0,
    splits: int = 0,
    whole_tiles: int | None = None,
) -> PrefillPlan:
    """Token tile, split-K count and whole tiles of least estimated time (:func:`_prefill_cost_us`) unless given: the
    tiles of :data:`PREFILL_TILES` below twice the token count (64 always), 1 to :data:`PREFILL_MAX_SPLITS` splits, and
    either every tile split or only those past the last whole wave of CTAs (so that the split ones fill the SMs the
    last wave would leave idle). With one split every tile is whole.

    Raises:
        ValueError: ``whole_tiles`` outside 0 to the number of tiles.

    Example:
        >>> plan_prefill(512, 4096, 512, 132)
        PrefillPlan(token_tile=128, splits=1, stages_per_split=64, whole_tiles=128)
    """
    stages = groups // 8
    candidates = []
    for tile in (
        [token_tile] if token_tile > 0 else [t for t in PREFILL_TILES if t == PREFILL_TILES[0] or t < 2 * tokens]
    ):
        tiles = -(-out_features // PREFILL_ROWS) * -(-tokens // tile)
        if whole_tiles is not None and not 0 <= whole_tiles <= tiles:
            raise ValueError(f"whole_tiles={whole_tiles}: the plan has {tiles} tiles of {tile} tokens")
        wave = _prefill_wave(tile, sm_count)
        for count in [splits] if splits > 0 else range(1, PREFILL_MAX_SPLITS + 1):
            per_split = -(-stages // max(1, min(count, stages)))
            actual = -(-stages // per_split)
            if actual == 1:
                wholes = [tiles]
            elif whole_tiles is not None:
                wholes = [whole_tiles]
            else:
                wholes = sorted({0, tiles // wave * wave})
            for whole in wholes:
                cost = _prefill_cost_us(tokens, out_features, stages, sm_count, tile, actual, whole)
                candidates.append((cost, tile, actual, per_split, whole))
    _, tile, actual, per_split, whole = min(candidates)
    return PrefillPlan(tile, actual, per_split, whole)


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
    whole_tiles: int | None = None,
) -> torch.Tensor:
    """``input @ W.T + bias`` with the prefill kernel (``token_tile`` / ``splits`` > 0 and ``whole_tiles`` force the
    plan: :func:`plan_prefill`).

    Raises:
        RuntimeError: the extension cannot be built here.
        ValueError: ``whole_tiles`` outside 0 to the plan's number of tiles.

    Example:
        >>> launch_prefill(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """

    def run(module: ModuleType, x: torch.Tensor, *layer: torch.Tensor | None) -> torch.Tensor:
        out_features, groups, _ = codes.shape
        p = plan_prefill(x.shape[0], out_features, groups, _sm_count(_index(x.device)), token_tile, splits, whole_tiles)
        return module.prefill(x, *layer, *p)

    return _launch(run, input, codes, codebooks, scales, bias, None)


def _custom_op(
    name: str,
    schema: str,
    run: Callable[..., torch.Tensor],
    fallback: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
    doc: str,
) -> Callable[..., torch.Tensor]:
    """Registers the custom op ``aqlm_ctx::<name>`` (``schema``) and returns its public caller, documented by ``doc``.

    The op runs ``run(*args)`` with the first argument's device current, or ``fallback(*args)`` when the extension
    did not build (only reachable when torch.compile traced the first call); ``fake(*args)`` is its shape-only
    implementation for tracing.
    """

    def impl(*args: torch.Tensor | None) -> torch.Tensor:
        device = args[0].device  # type: ignore[union-attr]
        if build(device) is None:
            return fallback(*args)
        if device.index == torch.cuda.current_device():  # the common case: no device switch (~5 us per call)
            return run(*args)
        with torch.cuda.device(device):
            return run(*args)

    op = define(name, schema, impl, fake)

    def public(*args: torch.Tensor | None) -> torch.Tensor:
        return op(*args)

    public.__name__ = public.__qualname__ = name
    public.__doc__ = doc
    return public


def _matmul_fake(input: torch.Tensor, codes: torch.Tensor, *_: torch.Tensor | None) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], codes.shape[0]))


def _dequantize_run(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _module(codes.device).dequantize(codes, codebooks.contiguous(), scales.reshape(-1).contiguous())


def _dequantize_fallback(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from .reference import dequantize_weight

    return dequantize_weight(codes, codebooks, scales).to(codebooks.dtype)


def _dequantize_fake(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codebooks.new_empty((codes.shape[0], codes.shape[1] * 8))


def _matmul_op(
    public_name: str, op_name: str, run: Callable[..., torch.Tensor], accepts: str
) -> Callable[..., torch.Tensor]:
    """A matmul custom op ``aqlm_ctx::<op_name>`` (``run`` when built, Triton or stock otherwise)."""
    return _custom_op(
        op_name,
        MATMUL_SCHEMA,
        run,
        _triton_or_stock_matmul,
        _matmul_fake,
        f"""``{public_name}(input, codes, codebooks, scales, bias)``: ``input @ W.T + bias`` on the GPU for a layer
    :func:`{accepts}` accepts (custom op ``aqlm_ctx::{op_name}``). Codes are only read.

    Example:
        >>> y = {public_name}(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """,
    )


matmul = _matmul_op("matmul", "aqlm_decode", launch, "supports")
matmul_1x16 = _matmul_op("matmul_1x16", "aqlm_decode_1x16", launch_1x16, "supports_1x16")
prefill_matmul = _matmul_op("prefill_matmul", "aqlm_prefill", launch_prefill, "supports_prefill")

dequantize = _custom_op(
    "aqlm_dequantize",
    "(Tensor codes, Tensor codebooks, Tensor scales) -> Tensor",
    _dequantize_run,
    _dequantize_fallback,
    _dequantize_fake,
    """``dequantize(codes, codebooks, scales)``: the dense weight ``[out_features, in_features]`` (codebooks' dtype,
    scales applied) on the GPU (custom op ``aqlm_ctx::aqlm_dequantize``).

    Example:
        >>> w = dequantize(layer.codes, layer.codebooks, layer.scales)  # doctest: +SKIP
    """,
)


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

# mypy: disable-error-code="no-untyped-def"
"""Triton kernels for AQLM layers (in_group_size 8, out_group_size 1; 1x16, 2x8 and 1x8 codebooks).

Imported lazily by :mod:`aqlm_ctx.kernels.triton_kernels`, only once a CUDA tensor reaches it: this module needs
triton. Both kernels read the checkpoint layout directly: codes ``[out_groups, in_groups, num_codebooks]``,
codebooks ``[C, 2**nbits, 1, 8]``, scales ``[out, 1, 1, 1]``.

* ``_aqlm_gemv_kernel`` (1-4 tokens): each program owns ``BO`` output rows and a slice of the input groups,
  gathers the codebook vectors (codebooks of 256 entries stay in L1), multiplies them with the tokens in
  registers and keeps a per-thread fp32 accumulator that is reduced once at the end.
* ``_aqlm_gemm_kernel`` (more tokens): the same dequantized ``[BO, 8*BI]`` weight tile goes through ``tl.dot``
  (tensor cores) against a ``[BT, 8*BI]`` token tile.

Both fuse scales and bias. When too few output tiles exist to fill the GPU, the input groups are split over
``split`` programs (split-K): each writes an fp32 partial, and the last one to finish a tile (a ticket counter
that resets itself) sums the partials in a fixed order and writes the output, so one launch does the whole layer
and the result is deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Config", "launch", "pick_config"]


@triton.jit
def _epilogue(
    acc,
    offs_t,
    offs_o,
    mask_t,
    mask_o,
    y_ptr,
    stride_yt,
    scales_ptr,
    bias_ptr,
    ws_ptr,
    cnt_ptr,
    n_tok,
    n_out,
    tile_id,
    pid_k,
    split,
    HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr,
):
    """Scale, add bias and store ``acc`` ([tokens, rows], fp32); with split-K, reduce the partials first."""
    mask = mask_t[:, None] & mask_o[None, :]
    scale = tl.load(scales_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    y_offs = offs_t.to(tl.int64)[:, None] * stride_yt + offs_o[None, :]
    if USE_SPLIT:
        ws_offs = offs_t[:, None] * n_out + offs_o[None, :]
        tl.store(ws_ptr + pid_k * n_tok * n_out + ws_offs, acc, mask=mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if ticket == split - 1:
            total = tl.zeros_like(acc)
            for s in range(split):
                total += tl.load(ws_ptr + s * n_tok * n_out + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
            out = total * scale[None, :]
            if HAS_BIAS:
                out += bias[None, :]
            tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
    else:
        out = acc * scale[None, :]
        if HAS_BIAS:
            out += bias[None, :]
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_tile(
    codes_ptr,
    cb_ptr,
    offs_o,
    gi,
    m2,
    stride_co,
    stride_cg,
    stride_cc,
    NUM_CB: tl.constexpr,
    CB_SIZE: tl.constexpr,
):
    """``[BO, BI, 8]`` weight tile (codebook dtype, unscaled): sum over codebooks of the coded vectors."""
    offs_b = tl.arange(0, 8)
    row = offs_o.to(tl.int64)[:, None] * stride_co + gi[None, :] * stride_cg
    code = tl.load(codes_ptr + row, mask=m2, other=0, eviction_policy="evict_first")
    code = code.to(tl.int32) & (CB_SIZE - 1)
    w = tl.load(cb_ptr + code[:, :, None] * 8 + offs_b[None, None, :], eviction_policy="evict_last")
    for c in tl.static_range(1, NUM_CB):
        code = tl.load(codes_ptr + row + c * stride_cc, mask=m2, other=0, eviction_policy="evict_first")
        code = code.to(tl.int32) & (CB_SIZE - 1)
        w += tl.load(
            cb_ptr + c * CB_SIZE * 8 + code[:, :, None] * 8 + offs_b[None, None, :],
            eviction_policy="evict_last",
        )
    return w


@triton.jit
def _aqlm_gemv_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    scales_ptr,
    bias_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    n_tok,
    n_out,
    n_groups,
    stride_xt,
    stride_co,
    stride_cg,
    stride_cc,
    stride_yt,
    groups_per_split,
    split,
    NUM_CB: tl.constexpr,
    CB_SIZE: tl.constexpr,
    TP: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr,
):
    """Few tokens: CUDA-core dot products on the gathered codebook vectors, fp32 accumulation."""
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_o = pid_o * BO + tl.arange(0, BO)
    mask_o = offs_o < n_out
    offs_i = tl.arange(0, BI)
    offs_b = tl.arange(0, 8)
    offs_t = tl.arange(0, TP)
    mask_t = offs_t < n_tok
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, n_groups)
    acc = tl.zeros([TP, BO, BI, 8], dtype=tl.float32)
    for g_off in range(0, groups_per_split, BI):
        g0 = g_start + g_off
        gi = g0 + offs_i
        mask_i = gi < g_end
        m2 = mask_o[:, None] & mask_i[None, :]
        w = _dequant_tile(codes_ptr, cb_ptr, offs_o, gi, m2, stride_co, stride_cg, stride_cc, NUM_CB, CB_SIZE)
        x_offs = offs_t[:, None, None] * stride_xt + gi[None, :, None] * 8 + offs_b[None, None, :]
        xv = tl.load(x_ptr + x_offs, mask=mask_t[:, None, None] & mask_i[None, :, None], other=0.0)
        acc += w.to(tl.float32)[None, :, :, :] * xv.to(tl.float32)[:, None, :, :]
    res = tl.sum(tl.sum(acc, axis=3), axis=2)
    tile_id = pid_o
    _epilogue(
        res,
        offs_t,
        offs_o,
        mask_t,
        mask_o,
        y_ptr,
        stride_yt,
        scales_ptr,
        bias_ptr,
        ws_ptr,
        cnt_ptr,
        n_tok,
        n_out,
        tile_id,
        pid_k,
        split,
        HAS_BIAS,
        USE_SPLIT,
    )


@triton.jit
def _aqlm_gemm_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    scales_ptr,
    bias_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    n_tok,
    n_out,
    n_groups,
    stride_xt,
    stride_co,
    stride_cg,
    stride_cc,
    stride_yt,
    groups_per_split,
    split,
    NUM_CB: tl.constexpr,
    CB_SIZE: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr,
):
    """Many tokens: dequantize a ``[BO, 8*BI]`` tile in registers and multiply on tensor cores (``tl.dot``)."""
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    BK: tl.constexpr = BI * 8
    offs_o = pid_o * BO + tl.arange(0, BO)
    mask_o = offs_o < n_out
    offs_t = pid_t * BT + tl.arange(0, BT)
    mask_t = offs_t < n_tok
    offs_i = tl.arange(0, BI)
    offs_k = tl.arange(0, BK)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, n_groups)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros([BT, BO], dtype=tl.float32)
    for g_off in range(0, groups_per_split, BI):
        g0 = g_start + g_off
        gi = g0 + offs_i
        m2 = mask_o[:, None] & (gi < g_end)[None, :]
        w = _dequant_tile(codes_ptr, cb_ptr, offs_o, gi, m2, stride_co, stride_cg, stride_cc, NUM_CB, CB_SIZE)
        w = tl.reshape(w, [BO, BK]).to(x_ptr.dtype.element_ty)
        k = g0 * 8 + offs_k
        xv = tl.load(x_rows + k[None, :], mask=mask_t[:, None] & (k < g_end * 8)[None, :], other=0.0)
        acc = tl.dot(xv, tl.trans(w), acc)
    tile_id = pid_t * tl.num_programs(0) + pid_o
    _epilogue(
        acc,
        offs_t,
        offs_o,
        mask_t,
        mask_o,
        y_ptr,
        stride_yt,
        scales_ptr,
        bias_ptr,
        ws_ptr,
        cnt_ptr,
        n_tok,
        n_out,
        tile_id,
        pid_k,
        split,
        HAS_BIAS,
        USE_SPLIT,
    )


@dataclass(frozen=True)
class Config:
    """Launch parameters: ``bt`` tokens per tile (0: CUDA-core gemv), ``bo`` rows, ``bi`` groups per step."""

    bt: int
    bo: int
    bi: int
    num_warps: int = 4
    num_stages: int = 2
    split: int = 0  # 0: choose from the grid size; 1: no split-K


MAX_TILES_WITH_SPLIT = 4096


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


_COUNTERS: dict[int, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor | None:
    """Per-device ticket counters for split-K (all zero between launches: the last program resets its own)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cnt = _COUNTERS.get(index)
    if cnt is None:
        if torch.cuda.is_current_stream_capturing():
            return None  # allocating inside a capture would tie the buffer to that graph's pool
        cnt = torch.zeros(MAX_TILES_WITH_SPLIT, dtype=torch.int32, device=device)
        _COUNTERS[index] = cnt
    return cnt


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def token_bucket(tokens: int) -> int:
    """Token-count bucket a config is chosen for: 1, 4, 8, 16, 64 or 0 (more)."""
    for bound in (1, 4, 8, 16, 64):
        if tokens <= bound:
            return bound
    return 0


def pick_config(tokens: int, out_features: int, in_groups: int, num_codebooks: int, codebook_size: int) -> Config:
    """Tile sizes by token count and codebook format (from sweeps on an H200, see BENCHMARKS.md)."""
    bucket = token_bucket(tokens)
    if codebook_size <= 256:
        if bucket == 1:
            return Config(bt=0, bo=8, bi=32, num_warps=4) if num_codebooks == 2 else Config(0, 32, 32, 4)
        if bucket == 4:
            return Config(bt=0, bo=8, bi=8, num_warps=4) if num_codebooks == 2 else Config(0, 16, 8, 4)
    else:
        if bucket == 1:
            return Config(bt=0, bo=8, bi=64, num_warps=2)
        if bucket == 4:
            return Config(bt=0, bo=32, bi=8, num_warps=4)
    if bucket in (8, 16):
        return Config(bt=16, bo=64, bi=8, num_warps=4, num_stages=2)
    if bucket == 64:
        return Config(bt=64, bo=64, bi=8, num_warps=4, num_stages=2)
    if codebook_size > 256:
        return Config(bt=128, bo=64, bi=8, num_warps=4, num_stages=2)
    return Config(bt=256, bo=128, bi=8, num_warps=8, num_stages=2)


def _choose_split(tiles: int, in_groups: int, bi: int, index: int, requested: int) -> int:
    if requested > 0:
        split = requested
    else:
        target = 2 * _sm_count(index)
        if tiles >= target:
            return 1
        split = -(-target // tiles)
    steps = -(-in_groups // bi)
    return max(1, min(split, steps))


def launch(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    config: Config | None = None,
) -> torch.Tensor:
    """``input @ W.T + bias``; one kernel launch (plus a copy when the input's last dimension is strided)."""
    num_codebooks, codebook_size, _, in_group_size = codebooks.shape
    out_features, in_groups, _ = codes.shape
    in_features = in_groups * in_group_size
    lead = input.shape[:-1]
    x = input.reshape(-1, in_features)
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens = x.shape[0]
    y = torch.empty((tokens, out_features), dtype=input.dtype, device=input.device)
    if tokens == 0:
        return y.view(*lead, out_features)
    cb = codebooks if codebooks.is_contiguous() else codebooks.contiguous()
    sc = scales.reshape(-1)
    if not sc.is_contiguous():
        sc = sc.contiguous()
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    cfg = config or pick_config(tokens, out_features, in_groups, num_codebooks, codebook_size)
    index = input.device.index if input.device.index is not None else torch.cuda.current_device()

    o_tiles = -(-out_features // cfg.bo)
    t_tiles = 1 if cfg.bt == 0 else -(-tokens // cfg.bt)
    tiles = o_tiles * t_tiles
    split = _choose_split(tiles, in_groups, cfg.bi, index, cfg.split)
    cnt = None
    if split > 1 and tiles <= MAX_TILES_WITH_SPLIT:
        cnt = _counters(input.device)
    if cnt is None:
        split = 1
    groups_per_split = -(-in_groups // split)
    groups_per_split = -(-groups_per_split // cfg.bi) * cfg.bi
    split = -(-in_groups // groups_per_split)
    use_split = split > 1
    ws = (
        torch.empty((split, tokens, out_features), dtype=torch.float32, device=input.device)
        if use_split
        else y  # unused placeholder
    )
    cnt_arg = cnt if (use_split and cnt is not None) else y
    b_arg = b if b is not None else sc
    common = (
        x,
        codes,
        cb,
        sc,
        b_arg,
        y,
        ws,
        cnt_arg,
        tokens,
        out_features,
        in_groups,
        x.stride(0),
        codes.stride(0),
        codes.stride(1),
        codes.stride(2),
        y.stride(0),
        groups_per_split,
        split,
    )
    with torch.cuda.device(index):
        if cfg.bt == 0:
            tp = _next_pow2(tokens)
            _aqlm_gemv_kernel[(o_tiles, split)](
                *common,
                NUM_CB=num_codebooks,
                CB_SIZE=codebook_size,
                TP=tp,
                BO=cfg.bo,
                BI=cfg.bi,
                HAS_BIAS=b is not None,
                USE_SPLIT=use_split,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        else:
            _aqlm_gemm_kernel[(o_tiles, t_tiles, split)](
                *common,
                NUM_CB=num_codebooks,
                CB_SIZE=codebook_size,
                BT=cfg.bt,
                BO=cfg.bo,
                BI=cfg.bi,
                HAS_BIAS=b is not None,
                USE_SPLIT=use_split,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
    return y.view(*lead, out_features)

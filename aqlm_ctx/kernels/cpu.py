"""Race-free CPU kernels for AQLM layers (numba).

aqlm's own CPU kernel runs ``numba.prange`` over input groups and adds into shared outputs, so with more than one
thread some calls return wrong values. The kernels here are parallel over OUTPUT rows: every thread owns the rows
it writes and there is no shared accumulator, so results do not depend on the thread count or timing.

Paths, chosen per call by :func:`matmul`:

* 256-entry (or smaller) codebooks, out_group_size 1, few tokens: a lookup table ``LUT[j, c, k] = x_j . cb[c, k]``
  per token, then ``y[i] = scale[i] * sum_j sum_c LUT[j, c, codes[i, j, c]]``. One token uses
  :func:`_lut_gemv_kernel`; several use :func:`_lut_gemm_kernel`, with the token dimension innermost in the
  table. Within a block of rows, one table row (one input group and codebook) is applied to every row of the
  block before the next, so the table is read once per block and each row's codes stream through the cache.
* any codebook size, few tokens, codebooks too large for a table (1x16): :func:`_gather_gemv_kernel` sums the
  code vectors of each row group directly against the input (no table).
* many tokens (prefill): :func:`_dequantize_kernel` builds the dense weight in parallel, then ``F.linear``.

Every kernel is compiled once (shapes are runtime arguments) and cached on disk by numba. Numba's default
``workqueue`` threading layer must not be entered by two Python threads at once, so calls hold a module lock.
Neither ``numba.set_num_threads`` nor ``NUMBA_NUM_THREADS`` is touched: the kernels use numba's default thread
count (the number of cores), and torch's own thread settings are left alone.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LUT_MAX_TOKENS", "GATHER_MAX_TOKENS", "matmul", "supports"]

#: Up to this many tokens, 256-entry codebooks run through the lookup-table kernels; above, dequantize + F.linear.
LUT_MAX_TOKENS = 16
#: Up to this many tokens, large codebooks (1x16) run through the gather kernel; above, dequantize + F.linear.
GATHER_MAX_TOKENS = 4
#: Codebooks with at most this many entries get lookup tables.
LUT_MAX_CODEBOOK_SIZE = 256

#: Serialises kernel calls: numba's default workqueue threading layer is not safe for concurrent callers.
_LOCK = threading.Lock()

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency (aqlm[cpu]); degrade to "unsupported".
    numba = None  # type: ignore[assignment]


if numba is not None:
    _njit = numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)

    @_njit
    def _lut_gemv_kernel(lut: Any, codes: Any, scales: Any, out: Any, rows_per_block: int) -> None:
        # lut [Q * K] (Q = in_groups * num_codebooks), codes [O, Q] unsigned, scales [O], out [O].
        # Each parallel item owns a block of output rows. Inside it the table row of one q (K floats, in L1) is
        # applied to every row of the block before moving on, as aqlm's kernel does, so the table is read once
        # per block and a row's codes cache line serves many consecutive q. Sums run in q order: deterministic.
        n_rows, n_q = codes.shape
        k_size = lut.shape[0] // n_q
        mask = k_size - 1
        n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
        n2 = n_q // 2 * 2
        for blk in numba.prange(n_blocks):
            r0 = blk * rows_per_block
            r1 = min(n_rows, r0 + rows_per_block)
            acc = np.zeros(r1 - r0, dtype=np.float32)
            for q in range(0, n2, 2):
                base0 = q * k_size
                base1 = base0 + k_size
                for i in range(r0, r1):
                    acc[i - r0] += (
                        lut[base0 + (np.intp(codes[i, q]) & mask)] + lut[base1 + (np.intp(codes[i, q + 1]) & mask)]
                    )
            for q in range(n2, n_q):
                base0 = q * k_size
                for i in range(r0, r1):
                    acc[i - r0] += lut[base0 + (np.intp(codes[i, q]) & mask)]
            for i in range(r0, r1):
                out[i] = acc[i - r0] * scales[i]

    @_njit
    def _lut_gemm_kernel(lut: Any, codes: Any, scales: Any, out: Any, rows_per_block: int) -> None:
        # lut [Q * K, T] (token innermost), codes [O, Q] unsigned, scales [O], out [T, O]. Same order as above.
        n_rows, n_q = codes.shape
        n_tokens = lut.shape[1]
        k_size = lut.shape[0] // n_q
        mask = k_size - 1
        n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
        for blk in numba.prange(n_blocks):
            r0 = blk * rows_per_block
            r1 = min(n_rows, r0 + rows_per_block)
            acc = np.zeros((r1 - r0, n_tokens), dtype=np.float32)
            for q in range(n_q):
                base = q * k_size
                for i in range(r0, r1):
                    k = base + (np.intp(codes[i, q]) & mask)
                    for t in range(n_tokens):
                        acc[i - r0, t] += lut[k, t]
            for t in range(n_tokens):
                for i in range(r0, r1):
                    out[t, i] = acc[i - r0, t] * scales[i]

    @_njit
    def _gather_gemv_kernel(x: Any, codebooks: Any, codes: Any, scales: Any, out: Any, rows_per_block: int) -> None:
        # x [T, G, g], codebooks [C, K, g], codes [O, G, C], scales [O], out [T, O].
        n_rows, n_groups, n_cb = codes.shape
        n_tokens = x.shape[0]
        k_size = codebooks.shape[1]
        group = codebooks.shape[2]
        mask = k_size - 1
        n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
        for blk in numba.prange(n_blocks):
            r0 = blk * rows_per_block
            r1 = min(n_rows, r0 + rows_per_block)
            vec = np.empty(group, dtype=np.float32)
            for i in range(r0, r1):
                for t in range(n_tokens):
                    out[t, i] = 0
                for j in range(n_groups):
                    k = np.intp(codes[i, j, 0]) & mask
                    for b in range(group):
                        vec[b] = codebooks[0, k, b]
                    for c in range(1, n_cb):
                        k = np.intp(codes[i, j, c]) & mask
                        for b in range(group):
                            vec[b] += codebooks[c, k, b]
                    for t in range(n_tokens):
                        s = np.float32(0)
                        for b in range(group):
                            s += x[t, j, b] * vec[b]
                        out[t, i] += s
                for t in range(n_tokens):
                    out[t, i] *= scales[i]

    @_njit
    def _dequantize_kernel(codebooks: Any, codes: Any, scales: Any, weight: Any) -> None:
        # codebooks [C, K, g], codes [O, G, C], scales [O], weight [O, G * g].
        n_rows, n_groups, n_cb = codes.shape
        k_size = codebooks.shape[1]
        group = codebooks.shape[2]
        mask = k_size - 1
        for i in numba.prange(n_rows):
            s = scales[i]
            for j in range(n_groups):
                base = j * group
                k = np.intp(codes[i, j, 0]) & mask
                for b in range(group):
                    weight[i, base + b] = codebooks[0, k, b]
                for c in range(1, n_cb):
                    k = np.intp(codes[i, j, c]) & mask
                    for b in range(group):
                        weight[i, base + b] += codebooks[c, k, b]
                for b in range(group):
                    weight[i, base + b] *= s


def supports(input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """Whether :func:`matmul` handles this layer on CPU.

    True for CPU tensors with floating-point input and codebooks, ``out_group_size == 1``, a power-of-two codebook
    size that the codes' integer type can hold, and numba importable.

    Args:
        input: ``[..., in_features]``.
        codes: ``[out_groups, in_groups, num_codebooks]`` int8/uint8/int16.
        codebooks: ``[num_codebooks, codebook_size, out_group_size, in_group_size]``.
    """
    if input.device.type != "cpu" or codes.device.type != "cpu" or codebooks.device.type != "cpu":
        return False
    if not (input.is_floating_point() and codebooks.is_floating_point()) or codes.dim() != 3:
        return False
    if codebooks.dim() != 4 or codebooks.shape[2] != 1:
        return False
    num_codebooks, codebook_size, _, in_group_size = codebooks.shape
    if codebook_size < 1 or codebook_size & (codebook_size - 1):
        return False
    if codes.dtype in (torch.int8, torch.uint8):
        if codebook_size > 256:
            return False
    elif codes.dtype == torch.int16:
        if codebook_size > 65536:
            return False
    else:
        return False
    if codes.shape[2] != num_codebooks or input.shape[-1] != codes.shape[1] * in_group_size:
        return False
    return numba is not None


def _unsigned_codes(codes: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy unless non-contiguous) of ``codes`` as unsigned integers of the same width."""
    array = codes.detach().contiguous().numpy()
    return array.view(np.uint16) if array.dtype == np.int16 else array.view(np.uint8)


def _rows_per_block(n_rows: int) -> int:
    """Rows per parallel work item: a few blocks per numba thread, 32 to 256 rows (accumulators stay in L1)."""
    n_blocks = max(1, numba.get_num_threads()) * 4
    return min(256, max(32, math.ceil(n_rows / n_blocks)))


def matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` on CPU for the AQLM weight that ``codes``/``codebooks``/``scales`` encode.

    Computes in float32 and returns ``input.dtype``. Inputs are never modified. Call only where :func:`supports`
    is true.

    Args:
        input: ``[..., in_features]``, any strides.
        codes: ``[out_groups, in_groups, num_codebooks]``, unsigned values stored in signed integers.
        codebooks: ``[num_codebooks, codebook_size, 1, in_group_size]``.
        scales: ``[out_groups, 1, 1, 1]``.
        bias: ``[out_features]`` or None.

    Raises:
        RuntimeError: numba is not importable.

    Example:
        >>> y = matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)  # doctest: +SKIP
    """
    if numba is None:
        raise RuntimeError("aqlm_ctx's CPU kernels need numba (pip install numba)")
    num_codebooks, codebook_size, _, in_group_size = codebooks.shape
    out_features, in_groups = codes.shape[0], codes.shape[1]
    lead = input.shape[:-1]
    x = input.detach().reshape(-1, input.shape[-1]).to(torch.float32)
    n_tokens = x.shape[0]
    cb = codebooks.detach().reshape(num_codebooks, codebook_size, in_group_size).to(torch.float32).contiguous()
    sc = scales.detach().reshape(-1).to(torch.float32).contiguous()
    codes_np = _unsigned_codes(codes)
    rows = _rows_per_block(out_features)
    small_codebook = codebook_size <= LUT_MAX_CODEBOOK_SIZE

    if n_tokens == 0:
        out = x.new_zeros(0, out_features)
    elif small_codebook and n_tokens <= LUT_MAX_TOKENS:
        n_q = in_groups * num_codebooks
        flat_codes = codes_np.reshape(out_features, n_q)
        out = torch.empty(n_tokens, out_features, dtype=torch.float32)
        if n_tokens == 1:
            # LUT[j, c, k] = x_j . cb[c, k], flattened to [(j * C + c) * K + k].
            lut = torch.matmul(x.view(in_groups, in_group_size), cb.view(-1, in_group_size).T).reshape(-1)
            with _LOCK:
                _lut_gemv_kernel(lut.numpy(), flat_codes, sc.numpy(), out.numpy()[0], rows)
        else:
            # LUT[(j * C + c) * K + k, t] = x_t,j . cb[c, k], token innermost.
            lut = torch.matmul(x.view(n_tokens, in_groups, in_group_size), cb.view(-1, in_group_size).T)
            lut = lut.reshape(n_tokens, n_q * codebook_size).T.contiguous()
            with _LOCK:
                _lut_gemm_kernel(lut.numpy(), flat_codes, sc.numpy(), out.numpy(), rows)
    elif not small_codebook and n_tokens <= GATHER_MAX_TOKENS:
        out = torch.empty(n_tokens, out_features, dtype=torch.float32)
        xg = x.contiguous().view(n_tokens, in_groups, in_group_size)
        with _LOCK:
            _gather_gemv_kernel(xg.numpy(), cb.numpy(), codes_np, sc.numpy(), out.numpy(), rows)
    else:
        weight = torch.empty(out_features, in_groups * in_group_size, dtype=torch.float32)
        with _LOCK:
            _dequantize_kernel(cb.numpy(), codes_np, sc.numpy(), weight.numpy())
        out = F.linear(x, weight)
    if bias is not None:
        out += bias.detach().to(torch.float32)
    return out.to(input.dtype).reshape(*lead, out_features)

"""Race-free CPU kernels for AQLM layers (numba).

aqlm's own CPU kernel runs ``numba.prange`` over input groups and adds into one shared output vector, so with more
than one thread some calls return wrong values. Here every parallel work item writes only memory it owns, and
results do not depend on the thread count or on timing.

Paths, chosen per call by :func:`matmul`:

* Codebooks of at most 256 entries, up to :data:`LUT_MAX_TOKENS` tokens: lookup tables. For one input group ``j``
  the table ``LUT[c, k, t] = x[t, j] . codebooks[c, k]`` turns every code of that group into one table read.
  :func:`_lut_gemv_kernel` (one token) and :func:`_lut_gemm_kernel` (a chunk of up to :data:`LUT_TOKEN_CHUNK`
  tokens, table built in L1 per group) split the input groups into :data:`LUT_PARTS` fixed parts; each part sums
  into its own partial output and the parts are added in a fixed order, so the result is the same at any thread
  count. They stream the codes of one input group for all output rows, which is why they read an *input-major*
  copy of the codes ``[in_groups, out_features, num_codebooks]``, made on the layer's first CPU call and cached
  beside it (one more byte per code; the layer's ``codes`` parameter, its ``state_dict`` and checkpoints keep the
  checkpoint layout and are never modified). The copy is made again when the codes change through torch (in-place
  ops such as ``codes.copy_(...)`` under ``torch.no_grad()``, ``load_state_dict``, new storage); writes through
  ``codes.data`` bypass torch's version counter and are not seen. Codes made under ``torch.inference_mode`` have no
  version counter: their copy is made on every call.
* Larger codebooks (1x16), up to :data:`TILE_MAX_TOKENS` tokens: :func:`_row_tile_kernel` works through blocks of
  :data:`TILE_ROWS` output rows; each block's weights are gathered from the codebooks into a small tile (L1/L2
  cache) and dotted with every token at once. A row is computed by one thread in one fixed order, so again the
  result does not depend on the thread count. (Its dot products are vectorised: LLVM may reassociate them, so the
  last bits depend on the CPU's vector width, never on timing.)
* Everything else (many tokens): blocks of output rows (:data:`DEQUANTIZE_BLOCK_BYTES`) are dequantized by
  :func:`_dequantize_rows_kernel` (the same gathers, bit for bit what
  :func:`~aqlm_ctx.kernels.reference.dequantize_weight` gives) and ``torch.matmul`` applies each; the full dense
  weight never exists.

Threads. numba's OpenMP pool and torch's are separate; an idle OpenMP thread spins before it sleeps, so on a
machine with few cores each pool slows the other down. The first call starts numba's pool with
``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once) unless the user set that variable or numba's pool is
already running; the environment is restored right after. Neither ``numba.set_num_threads`` nor torch's thread
settings are touched. Calls hold a module lock (numba's ``workqueue`` layer must not be entered by two Python
threads at once). numba's pool does not survive ``fork``: a process forked after these kernels ran (a ``fork``
multiprocessing pool, DataLoader workers) hangs or aborts in them; start such workers with the ``spawn`` method.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["LUT_MAX_TOKENS", "matmul", "supports"]

#: Up to this many tokens, codebooks of at most 256 entries run through the lookup-table kernel.
LUT_MAX_TOKENS = 32
#: The lookup-table kernel takes tokens in chunks of at most this many.
LUT_TOKEN_CHUNK = 16
#: Codebooks with at most this many entries get lookup tables.
LUT_MAX_CODEBOOK_SIZE = 256
#: Fixed number of input-group parts of the lookup-table kernel (independent of the thread count).
LUT_PARTS = 8
#: Up to this many tokens, codebooks of more than 256 entries run through the row-tile kernel.
TILE_MAX_TOKENS = 32
#: Output rows per block (and per gathered weight tile) of the row-tile kernel.
TILE_ROWS = 8
#: Bytes of dense float32 weight dequantized per block on the dequantize path.
DEQUANTIZE_BLOCK_BYTES = 2 << 20

#: Serialises kernel calls and guards the caches below.
_LOCK = threading.Lock()
#: codes tensor -> ((version, data pointer, codebook size), input-major unsigned copy, the storage it was made from:
#: held, so that new storage cannot take its address unnoticed).
_INPUT_MAJOR_CODES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_pool_started = False
_warned_inference = False

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency (aqlm[cpu]); degrade to "unsupported".
    numba = None  # type: ignore[assignment]


if numba is not None:
    _njit = numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)

    @_njit
    def _lut_gemv_kernel(lut: Any, codes_t: Any, scales: Any, out: Any, n_parts: int) -> None:
        # One token. lut [G, C, K], codes_t [G, O, C] (values < K), scales [O], out [O].
        # Direct indexing and the two-codebook special case: measured ~1.5x faster than array slices here.
        n_groups, n_rows, n_cb = codes_t.shape
        per_part = (n_groups + n_parts - 1) // n_parts
        partial = np.zeros((n_parts, n_rows), dtype=np.float32)
        for p in numba.prange(n_parts):
            for j in range(p * per_part, min(n_groups, (p + 1) * per_part)):
                if n_cb == 2:
                    for i in range(n_rows):
                        partial[p, i] += lut[j, 0, np.intp(codes_t[j, i, 0])] + lut[j, 1, np.intp(codes_t[j, i, 1])]
                else:
                    for i in range(n_rows):
                        s = np.float32(0)
                        for c in range(n_cb):
                            s += lut[j, c, np.intp(codes_t[j, i, c])]
                        partial[p, i] += s
        for i in numba.prange(n_rows):
            s = np.float32(0)
            for p in range(n_parts):
                s += partial[p, i]
            out[i] = s * scales[i]

    @_njit
    def _lut_gemm_kernel(x_t: Any, codebooks: Any, codes_t: Any, scales: Any, out: Any, n_parts: int) -> None:
        # Several tokens. x_t [G, g, T], codebooks [C, K, g], codes_t [G, O, C] (values < K), scales [O], out [T, O].
        n_groups, n_rows, n_cb = codes_t.shape
        group, n_tokens = x_t.shape[1], x_t.shape[2]
        k_size = codebooks.shape[1]
        per_part = (n_groups + n_parts - 1) // n_parts
        partial = np.zeros((n_parts, n_rows, n_tokens), dtype=np.float32)
        for p in numba.prange(n_parts):
            lut = np.empty((n_cb, k_size, n_tokens), dtype=np.float32)
            for j in range(p * per_part, min(n_groups, (p + 1) * per_part)):
                # The table of group j, token innermost: one vector add per code below.
                for c in range(n_cb):
                    for k in range(k_size):
                        for t in range(n_tokens):
                            lut[c, k, t] = 0
                        for b in range(group):
                            w = codebooks[c, k, b]
                            for t in range(n_tokens):
                                lut[c, k, t] += w * x_t[j, b, t]
                if n_cb == 2:
                    for i in range(n_rows):
                        k0 = np.intp(codes_t[j, i, 0])
                        k1 = np.intp(codes_t[j, i, 1])
                        for t in range(n_tokens):
                            partial[p, i, t] += lut[0, k0, t] + lut[1, k1, t]
                else:
                    for i in range(n_rows):
                        for c in range(n_cb):
                            code = np.intp(codes_t[j, i, c])
                            for t in range(n_tokens):
                                partial[p, i, t] += lut[c, code, t]
        for i in numba.prange(n_rows):
            for t in range(n_tokens):
                s = np.float32(0)
                for p in range(n_parts):
                    s += partial[p, i, t]
                out[t, i] = s * scales[i]

    @numba.njit(cache=True, nogil=True, inline="always")
    def _gather_row(codebooks: Any, codes: Any, mask: int, row: int, out: Any, r: int) -> None:
        # out[r] = sum over c of codebooks[c, codes[row, j, c] & mask] for every input group j, in codebook order.
        n_groups, n_cb = codes.shape[1], codes.shape[2]
        group = codebooks.shape[2]
        for j in range(n_groups):
            k = np.intp(codes[row, j, 0]) & mask
            for e in range(group):
                out[r, j * group + e] = codebooks[0, k, e]
            for c in range(1, n_cb):
                k = np.intp(codes[row, j, c]) & mask
                for e in range(group):
                    out[r, j * group + e] += codebooks[c, k, e]

    @numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _row_tile_kernel(x: Any, codebooks: Any, codes: Any, mask: int, scales: Any, out: Any, rows: int) -> None:
        # x [T, I], codebooks [C, K, g], codes [O, G, C] (unsigned; read & mask), scales [O], out [T, O].
        n_rows = codes.shape[0]
        n_tokens, in_features = x.shape
        for block in numba.prange((n_rows + rows - 1) // rows):
            first = block * rows
            n = min(n_rows, first + rows) - first
            tile = np.empty((n, in_features), dtype=np.float32)
            for r in range(n):
                _gather_row(codebooks, codes, mask, first + r, tile, r)
            for r in range(n):
                for t in range(n_tokens):
                    s = np.float32(0)
                    for f in range(in_features):
                        s += tile[r, f] * x[t, f]
                    out[t, first + r] = s * scales[first + r]

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _dequantize_rows_kernel(codebooks: Any, codes: Any, mask: int, scales: Any, first: int, out: Any) -> None:
        # out [n, I] = rows first .. first + n of the dense weight: codebook entries summed, then scaled.
        for r in numba.prange(out.shape[0]):
            _gather_row(codebooks, codes, mask, first + r, out, r)
            scale = scales[first + r]
            for f in range(out.shape[1]):
                out[r, f] *= scale


def supports(input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """Whether :func:`matmul` handles this layer on CPU.

    True for CPU tensors with floating-point input (not float64: these kernels compute in float32) and codebooks,
    ``out_group_size == 1``, a power-of-two codebook size that the codes' integer type can hold, and numba
    importable.

    Args:
        input: ``[..., in_features]``.
        codes: ``[out_groups, in_groups, num_codebooks]`` int8/uint8/int16.
        codebooks: ``[num_codebooks, codebook_size, out_group_size, in_group_size]``.
    """
    if input.device.type != "cpu" or codes.device.type != "cpu" or codebooks.device.type != "cpu":
        return False
    if not (input.is_floating_point() and codebooks.is_floating_point()) or codes.dim() != 3:
        return False
    if input.dtype == torch.float64:  # these kernels compute in float32; plain torch keeps float64 exact
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


def _start_thread_pool() -> None:
    """Start numba's thread pool with idle threads that sleep instead of spinning (see the module docstring)."""
    global _pool_started
    if _pool_started:
        return
    _pool_started = True
    from numba.np.ufunc import parallel

    if getattr(parallel, "_is_initialized", True) or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        parallel._launch_threads()
    finally:
        del os.environ["OMP_WAIT_POLICY"]


def _unsigned_codes(codes: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy unless non-contiguous) of ``codes`` as unsigned integers of the same width."""
    array = codes.detach().contiguous().numpy()
    return array.view(np.uint16) if array.dtype == np.int16 else array.view(np.uint8)


def _key(codes: torch.Tensor) -> tuple[int, int]:
    """What identifies the current contents of ``codes``: its version counter and data pointer."""
    return codes._version, codes.data_ptr()


#: Integer type as wide as one group's codes (num_codebooks x bytes per code), for a 2-D transpose.
_GROUP_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _transposed(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` ``[out, in_groups, C]`` as a new contiguous ``[in_groups, out, C]`` tensor.

    Each group's C codes move as one wider integer (a plain 2-D transpose, about twice as fast as copying the 3-D
    permutation) wherever the codes' layout allows that view.
    """
    out_features, in_groups, num_codebooks = codes.shape
    width = num_codebooks * codes.element_size()
    wide = _GROUP_INTS.get(width)
    if wide is None or not codes.is_contiguous() or codes.storage_offset() * codes.element_size() % width:
        return codes.permute(1, 0, 2).clone(memory_format=torch.contiguous_format)
    result = torch.empty((in_groups, out_features, num_codebooks), dtype=codes.dtype)
    result.view(wide).view(in_groups, out_features).copy_(codes.view(wide).view(out_features, in_groups).t())
    return result


def _input_major_codes(codes: torch.Tensor, codebook_size: int) -> np.ndarray:
    """``codes % codebook_size`` as unsigned ``[in_groups, out_features, num_codebooks]``, cached per codes tensor.

    The cache entry is rebuilt when the tensor is modified in place (its version changes), given new storage (the
    entry holds the old one, so the new one has another address) or read with another codebook size, and it
    disappears with the tensor. Entries of tensors whose data changed or
    left the CPU (``model.to("cuda")`` keeps the Parameter objects) are dropped whenever an entry is added.
    An inference tensor (made under ``torch.inference_mode``) has no version counter to tell an in-place write
    inside inference mode, so its copy is made again on every call. Call with ``_LOCK`` held.
    """
    if codes.is_inference():
        global _warned_inference
        if not _warned_inference:
            _warned_inference = True
            warnings.warn(
                "aqlm_ctx CPU kernels: a layer's codes are inference tensors (made under torch.inference_mode), "
                "which have no version counter to tell an in-place write: their input-major copy is made on every "
                "call, about 2x slower; create, load or move the model outside torch.inference_mode",
                UserWarning,
                stacklevel=2,
            )
        return _input_major_copy(codes, codebook_size)
    key = (*_key(codes), codebook_size)
    cached = _INPUT_MAJOR_CODES.get(codes)
    if cached is not None and cached[0] == key:
        return cached[1]
    stale = [t for t, (k, *_) in _INPUT_MAJOR_CODES.items() if t.device.type != "cpu" or k[:2] != _key(t)]
    for tensor in stale:
        del _INPUT_MAJOR_CODES[tensor]
    array = _input_major_copy(codes, codebook_size)
    _INPUT_MAJOR_CODES[codes] = (key, array, codes.untyped_storage())
    return array


def _input_major_copy(codes: torch.Tensor, codebook_size: int) -> np.ndarray:
    """``codes % codebook_size`` as a new unsigned ``[in_groups, out_features, num_codebooks]`` array."""
    array = _unsigned_codes(_transposed(codes.detach()))
    if codebook_size < np.iinfo(array.dtype).max + 1:
        array &= array.dtype.type(codebook_size - 1)
    return array


@torch.compiler.disable  # numba compiles on a kernel's first call: torch.compile runs this eagerly (a graph break)
@torch.autocast("cpu", enabled=False)  # the lookup tables go to numba as float32 arrays
def matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` on CPU for the AQLM weight that ``codes``/``codebooks``/``scales`` encode.

    Computes in float32 (also under autocast) and returns ``input.dtype``. Inputs are never modified. Call only
    where :func:`supports` is true.

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
    out = torch.empty(n_tokens, out_features, dtype=torch.float32)

    if n_tokens == 0:
        pass
    elif codebook_size <= LUT_MAX_CODEBOOK_SIZE and n_tokens <= LUT_MAX_TOKENS:
        parts = min(LUT_PARTS, in_groups)
        with _LOCK:
            _start_thread_pool()
            codes_t = _input_major_codes(codes, codebook_size)
        if n_tokens == 1:
            # LUT[j, c, k] = x_j . cb[c, k]: one small matrix product.
            lut = torch.matmul(x.view(in_groups, in_group_size), cb.view(-1, in_group_size).T)
            with _LOCK:
                _lut_gemv_kernel(
                    lut.view(in_groups, num_codebooks, -1).numpy(), codes_t, sc.numpy(), out[0].numpy(), parts
                )
        else:
            for start in range(0, n_tokens, LUT_TOKEN_CHUNK):
                # Tokens in chunks: each part's partial sums [out_features, chunk] must stay in the L2 cache.
                chunk = x[start : start + LUT_TOKEN_CHUNK]
                x_t = chunk.reshape(chunk.shape[0], in_groups, in_group_size).permute(1, 2, 0).contiguous()
                with _LOCK:
                    _lut_gemm_kernel(
                        x_t.numpy(), cb.numpy(), codes_t, sc.numpy(), out[start : start + len(chunk)].numpy(), parts
                    )
    elif codebook_size > LUT_MAX_CODEBOOK_SIZE and n_tokens <= TILE_MAX_TOKENS:
        with _LOCK:
            _start_thread_pool()
            _row_tile_kernel(
                x.contiguous().numpy(), cb.numpy(), _unsigned_codes(codes), codebook_size - 1, sc.numpy(), out.numpy(),
                TILE_ROWS,
            )  # fmt: skip
    else:
        # Blocks of output rows dequantized into one reused buffer (cache-resident), each applied with torch.matmul.
        rows = max(1, min(out_features, DEQUANTIZE_BLOCK_BYTES // (4 * in_groups * in_group_size)))
        block = torch.empty(rows, in_groups * in_group_size, dtype=torch.float32)
        with _LOCK:
            _start_thread_pool()
        unsigned = _unsigned_codes(codes)
        for start in range(0, out_features, rows):
            weight = block[: min(out_features, start + rows) - start]
            with _LOCK:
                _dequantize_rows_kernel(cb.numpy(), unsigned, codebook_size - 1, sc.numpy(), start, weight.numpy())
            torch.matmul(x, weight.T, out=out[:, start : start + len(weight)])
    if bias is not None:
        out += bias.detach().to(torch.float32)
    return out.to(input.dtype).reshape(*lead, out_features)

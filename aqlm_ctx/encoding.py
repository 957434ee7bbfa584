"""Encode a dense weight into AQLM form: the codes, codebooks and scales that ``aqlm.QuantizedLinear`` reads.

The weight is cut into groups of ``out_group_size x in_group_size`` entries. Each output group gets a scale;
the scaled groups are approximated by a sum of ``num_codebooks`` codebook entries, one per codebook:

1. scales: the RMS of each output group's rows (refit by least squares after every round);
2. codebooks: residual k-means (codebook ``c`` is fit on what codebooks ``< c`` leave over);
3. codes: beam search over the additive codebooks (exact nearest entry when there is one codebook);
4. ``rounds`` times: codebooks refit by least squares given the codes, scales refit, codes searched again.

The error is weighted so that it is the true weight error ``||W - Ŵ||²``. With ``input_stats`` (``XᵀX`` of the
layer's inputs) it becomes the output error ``||(W - Ŵ)X||²`` restricted to the block-diagonal part of ``XᵀX``
(one ``in_group_size`` block per input group, which keeps every group's distance local), and a last joint
codebook and scale refit uses the full ``XᵀX``. ``benchmarks/encoder.py`` measures both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from .config import AqlmConfig, ConfigLike, as_config

__all__ = ["EncodedLinear", "dequantize_encoded", "encode_linear", "quantized_bits_per_weight"]

_DENSE_SOLVE_LIMIT = 2048
"""Joint codebook least squares over all codebooks with at most this many unknowns solve one dense system."""
_CHUNK_ELEMENTS = 1 << 23
"""Rows of a distance matrix are processed in chunks of about this many elements (32 MiB in float32)."""
_CACHE_CHUNK_ELEMENTS = 1 << 20
"""The chunk of the exhaustive searches (k-means assignment, beam search) when torch runs one thread: 4 MiB
score blocks stay in cache and make these memory-bound searches ~2x faster. With several threads the larger
chunk is kept: fewer, longer parallel regions (much faster when other processes share the cores)."""
_DAMP = 1e-1
"""``input_stats`` gets ``_DAMP * mean(diag)`` added to its diagonal (as GPTQ/AQLM damp ``XᵀX``). 10% rather than
GPTQ's 1%: with a few thousand calibration tokens the sweeps otherwise fit the sample's ``XᵀX`` too closely (MiniLM
layers, held-out output error 10-20% lower than with 1%; the MiniLM demo's cosine 0.9825 -> 0.9830)."""
_RIDGE = 1e-6
"""Relative ridge that keeps unused codebook entries where they are during least squares refits."""
_EXHAUSTIVE_LIMIT = 4096
"""Codebooks up to this size are searched exhaustively; larger ones (1x16) by an inverted-file search."""
_PROBES = 4
"""Cells of a large codebook that the inverted-file search scores entry by entry."""
_SWEEP_COLUMNS = 128
"""Input columns per lazy batch of a sweep (the gradient of the others is updated once per batch)."""


@dataclasses.dataclass(frozen=True)
class EncodedLinear:
    """The AQLM tensors of one linear layer, laid out exactly as ``aqlm.QuantizedLinear`` stores them.

    Attributes:
        codes: ``[out_features // out_group_size, in_features // in_group_size, num_codebooks]``, int8 for
            ``nbits_per_codebook <= 8`` else int16; unsigned values stored signed (``v - 2**nbits`` when
            ``v >= 2**(nbits - 1)``), as ``aqlm.utils.pack_int_data`` does.
        codebooks: ``[num_codebooks, 2**nbits, out_group_size, in_group_size]``.
        scales: ``[out_features // out_group_size, 1, 1, 1]``, same dtype as ``codebooks``.

    Example:
        >>> enc = encode_linear(torch.randn(16, 32), {"num_codebooks": 2, "nbits_per_codebook": 4})
        >>> layer.codes.data, layer.codebooks.data, layer.scales.data = enc  # doctest: +SKIP
    """

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Unpack as ``codes, codebooks, scales``."""
        return iter((self.codes, self.codebooks, self.scales))

    def dequantize(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight these tensors encode (see :func:`dequantize_encoded`)."""
        return dequantize_encoded(self.codes, self.codebooks, self.scales)


def dequantize_encoded(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The dense weight ``W[o*og + a, i*ig + b] = scales[o] * sum_c codebooks[c, codes[o, i, c] mod 2**nbits, a, b]``.

    Args:
        codes: ``[out_groups, in_groups, num_codebooks]`` integer codes (unsigned values may be stored signed).
        codebooks: ``[num_codebooks, codebook_size, out_group_size, in_group_size]``.
        scales: ``[out_groups, 1, 1, 1]``.

    Returns:
        ``[out_groups * out_group_size, in_groups * in_group_size]`` in the dtype of ``codebooks``.
    """
    num_codebooks, codebook_size, og, ig = codebooks.shape
    out_groups, in_groups, _ = codes.shape
    index = codes.long() % codebook_size
    groups = torch.zeros(out_groups, in_groups, og, ig, dtype=codebooks.dtype, device=codebooks.device)
    for c in range(num_codebooks):
        groups += codebooks[c][index[..., c]]
    groups = groups * scales
    return groups.permute(0, 2, 1, 3).reshape(out_groups * og, in_groups * ig)


def quantized_bits_per_weight(config: ConfigLike, in_features: int, out_features: int) -> float:
    """Storage bits per weight of an AQLM layer: codes plus codebooks plus scales (no bias).

    Codes count at the width of the integer dtype they are stored in (8 bits for ``nbits_per_codebook <= 8``, else
    16: a 1x4 code takes a whole int8), codebooks and scales at 16 bits per value (fp16/bf16, as checkpoints store
    them); this is what :attr:`aqlm_ctx.ModelSummary.bits_per_weight` and ``aqlm-ctx inspect`` report for an fp16
    layer. The bits the codes carry (``nbits`` per code, as the AQLM paper counts them) are
    :attr:`aqlm_ctx.AqlmConfig.bits_per_weight`.

    Args:
        config: anything :func:`aqlm_ctx.config.as_config` accepts.
        in_features: input features of the layer.
        out_features: output features of the layer.

    Returns:
        Total bits divided by ``in_features * out_features``.

    Raises:
        ValueError: the features are not positive or not divisible by the group sizes.

    Example:
        >>> round(quantized_bits_per_weight({"num_codebooks": 2, "nbits_per_codebook": 8}, 4096, 4096), 3)
        2.008
    """
    cfg = as_config(config)
    _check_shape(out_features, in_features, cfg)
    og, ig = cfg.out_group_size, cfg.in_group_size
    code_bits = (out_features // og) * (in_features // ig) * cfg.num_codebooks * torch.iinfo(cfg.code_dtype).bits
    codebook_bits = cfg.num_codebooks * cfg.codebook_size * og * ig * 16
    scale_bits = (out_features // og) * 16
    return (code_bits + codebook_bits + scale_bits) / (in_features * out_features)


ENCODE_OPTIONS = {"rounds": 0, "beam_size": 1, "kmeans_iters": 0, "sweeps": 0}
"""The keyword options of :func:`encode_linear` after ``generator``, each with its smallest allowed value."""


def check_encode_options(**options: object) -> None:
    """Check :func:`encode_linear`'s ``rounds``/``beam_size``/``kmeans_iters``/``sweeps`` before any encoding.

    Raises:
        TypeError: an option is not one of these.
        ValueError: an option is not an int at least its smallest allowed value.
    """
    unknown = sorted(set(options) - set(ENCODE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown encoding option(s) {', '.join(unknown)}; allowed: {', '.join(ENCODE_OPTIONS)}")
    for name, value in options.items():
        low = ENCODE_OPTIONS[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_shape(out_features: int, in_features: int, cfg: AqlmConfig) -> None:
    if out_features <= 0 or in_features <= 0:
        raise ValueError(f"weight shape [{out_features}, {in_features}] must have positive sizes")
    if in_features % cfg.in_group_size:
        raise ValueError(
            f"in_features {in_features} of weight shape [{out_features}, {in_features}] is not divisible by "
            f"in_group_size {cfg.in_group_size}"
        )
    if out_features % cfg.out_group_size:
        raise ValueError(
            f"out_features {out_features} of weight shape [{out_features}, {in_features}] is not divisible by "
            f"out_group_size {cfg.out_group_size}"
        )


# --------------------------------------------------------------------------------------------------------------
# Building blocks. Groups are rows of a [N, d] matrix (N = out_groups * in_groups, d = og * ig, row n belongs to
# output group n // in_groups and input group n % in_groups); every group n has a weight w[n] (its scale squared)
# and, with input statistics, a metric M[n % in_groups] ([d, d], positive definite).
# --------------------------------------------------------------------------------------------------------------


def _metric_dot(x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """``M[n % in_groups] @ x[n]`` for every row of ``x`` ``[n, d]`` or ``[n, B, d]`` (``n`` a multiple of
    ``in_groups``, rows in group order); ``x`` itself without a metric."""
    if metric is None:
        return x
    grouped = x.view(-1, metric.shape[0], *x.shape[1:])  # [n / in_groups, in_groups, (B,) d]
    # One batched product per input group (einsum), not one [1, d] x [d, d] product per row: 2-4x faster.
    if x.dim() == 2:
        return torch.einsum("ngd,gde->nge", grouped, metric).reshape(x.shape)
    return torch.einsum("ngbd,gde->ngbe", grouped, metric).reshape(x.shape)


def _entry_norms(codebook: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """``eᵀ M_i e`` for every entry ``e`` of ``codebook`` ``[K, d]``: ``[1, K]`` or ``[in_groups, K]``."""
    if metric is None:
        return codebook.pow(2).sum(-1).unsqueeze(0)
    return torch.einsum("kd,ide,ke->ik", codebook, metric, codebook)


def _chunk_rows(total: int, per_row: int, multiple: int, elements: int = _CHUNK_ELEMENTS) -> int:
    rows = max(1, min(total, elements // max(per_row, 1)) // multiple) * multiple
    return min(rows, total)


def _search_chunk_elements() -> int:
    return _CACHE_CHUNK_ELEMENTS if torch.get_num_threads() == 1 else _CHUNK_ELEMENTS


def _row_scores(projected: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``||e||²_M - 2 (M t)·e`` for rows ``t`` (already projected) ``[n, d]`` and every entry: ``[n, K]``."""
    in_groups = norms.shape[0]
    if in_groups == 1:  # one fused pass over the [n, K] scores instead of three
        return torch.addmm(norms, projected, codebook.T, alpha=-2.0)
    scores = (projected @ codebook.T).view(-1, in_groups, codebook.shape[0])
    return scores.mul_(-2.0).add_(norms).view(projected.shape[0], -1)


def _nearest(targets: torch.Tensor, codebook: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """Index of the entry of ``codebook`` ``[K, d]`` closest to each row of ``targets`` ``[N, d]`` (under ``M``)."""
    norms = _entry_norms(codebook, metric)
    codes = torch.empty(targets.shape[0], dtype=torch.long, device=targets.device)
    step = _chunk_rows(targets.shape[0], codebook.shape[0], norms.shape[0], _search_chunk_elements())
    for start in range(0, targets.shape[0], step):
        sl = slice(start, start + step)
        codes[sl] = _row_scores(_metric_dot(targets[sl], metric), codebook, norms).argmin(dim=1)
    return codes


def _padded_cells(cell_of_row: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by cell: ``index [cells, R]`` (row numbers, ``-1`` for padding) and ``counts [cells]``."""
    counts = torch.bincount(cell_of_row, minlength=cells)
    order = torch.argsort(cell_of_row, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    width = max(int(counts.max()), 1)
    position = torch.arange(cell_of_row.shape[0], device=order.device) - starts[cell_of_row[order]]
    index = torch.full((cells, width), -1, dtype=torch.long, device=order.device)
    index[cell_of_row[order], position] = order
    return index, counts


def _cell_chunks(cells: int, width: int, per_cell: int) -> range:
    return range(0, cells, max(1, _CHUNK_ELEMENTS // max(width * per_cell, 1)))


def _cell_search(
    targets: torch.Tensor, codebook: torch.Tensor, metric: torch.Tensor | None, cells: int, probes: int
) -> torch.Tensor:
    """Approximate nearest entry for a large codebook whose entries form ``cells`` equal contiguous cells.

    Each row scores the cell means, then every entry of its ``probes`` best cells (an inverted-file search);
    rows are grouped by cell so that all cells are scored by a few batched matrix products.
    """
    size, d = codebook.shape
    per_cell = size // cells
    blocks = codebook.view(cells, per_cell, d)
    norms = _entry_norms(codebook, metric).view(-1, cells, per_cell)  # [I or 1, cells, per_cell]
    centres = blocks.mean(1)
    centre_norms = _entry_norms(centres, metric)
    in_groups = norms.shape[0]
    probes = min(probes, cells)
    projected = _metric_dot(targets, metric)
    best = torch.empty(targets.shape[0], probes, dtype=torch.long, device=targets.device)
    step = _chunk_rows(targets.shape[0], cells, in_groups)
    for start in range(0, targets.shape[0], step):
        sl = slice(start, start + step)
        best[sl] = _row_scores(projected[sl], centres, centre_norms).topk(probes, dim=1, largest=False).indices
    group = torch.arange(targets.shape[0], device=targets.device) % in_groups
    best_score = torch.full((targets.shape[0],), float("inf"), device=targets.device)
    codes = torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device)
    for probe in range(probes):
        index, _ = _padded_cells(best[:, probe], cells)
        for first in _cell_chunks(cells, index.shape[1], per_cell):
            chunk = slice(first, first + max(1, _CHUNK_ELEMENTS // (index.shape[1] * per_cell)))
            rows = index[chunk]
            valid = rows >= 0
            safe = rows.clamp_min(0)
            cell_ids = torch.arange(cells, device=targets.device)[chunk]
            scores = torch.bmm(projected[safe], blocks[chunk].transpose(1, 2)).mul_(-2.0)
            scores += norms[group[safe], cell_ids[:, None]]
            value, entry = scores.min(dim=2)
            flat_rows, value, entry = safe[valid], value[valid], (entry + cell_ids[:, None] * per_cell)[valid]
            better = value < best_score[flat_rows]
            best_score[flat_rows] = torch.where(better, value, best_score[flat_rows])
            codes[flat_rows] = torch.where(better, entry, codes[flat_rows])
    return codes


def _cell_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    cell_of_row: torch.Tensor,
    coarse: torch.Tensor,
    per_cell: int,
    iters: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean k-means with ``per_cell`` centroids inside every cell at once (rows padded per cell).

    Seeds are distinct random members of the cell (copies when it has fewer members than centroids; empty
    cells keep their coarse centroid). Returns ``(centroids [cells * per_cell, d], codes [N])``.
    """
    cells, d = coarse.shape
    device = points.device
    index, counts = _padded_cells(cell_of_row, cells)
    keys = torch.rand(index.shape, generator=generator, device=generator.device).to(device)
    keys = keys.masked_fill(index < 0, float("inf"))
    shuffled = torch.gather(index, 1, keys.argsort(dim=1))
    pick = torch.arange(per_cell, device=device) % counts.clamp_min(1)[:, None]
    seeds = torch.gather(shuffled, 1, pick)  # [cells, per_cell]
    centroids = torch.where((counts > 0)[:, None, None], points[seeds.clamp_min(0)], coarse[:, None, :]).reshape(
        cells * per_cell, d
    )
    valid = index >= 0
    rows = index[valid]
    codes = torch.empty(points.shape[0], dtype=torch.long, device=device)
    for iteration in range(iters + 1):
        blocks = centroids.view(cells, per_cell, d)
        for first in _cell_chunks(cells, index.shape[1], per_cell):
            chunk = slice(first, first + max(1, _CHUNK_ELEMENTS // (index.shape[1] * per_cell)))
            part = index[chunk]
            scores = torch.bmm(points[part.clamp_min(0)], blocks[chunk].transpose(1, 2)).mul_(-2.0)
            scores += blocks[chunk].pow(2).sum(-1).unsqueeze(1)
            entry = scores.argmin(dim=2) + torch.arange(cells, device=device)[chunk, None] * per_cell
            keep = part >= 0
            codes[part[keep]] = entry[keep]
        if iteration < iters:
            centroids = _refit_entries(points[rows], codes[rows], weights[rows], None, centroids)
    return centroids, codes


def _distances(targets: torch.Tensor, entries: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    diff = targets - entries
    return (diff * _metric_dot(diff, metric)).sum(-1)


def _group_index(rows: int, metric: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.arange(rows, device=device) % metric.shape[0]


def _refit_entries(
    targets: torch.Tensor,
    codes: torch.Tensor,
    weights: torch.Tensor,
    metric: torch.Tensor | None,
    current: torch.Tensor,
) -> torch.Tensor:
    """Least-squares entries of one codebook given its codes: each entry solves its own ``d x d`` system.

    Minimises ``sum_n w[n] ||targets[n] - E[codes[n]]||²_M``; unused entries keep their ``current`` value.
    """
    size, d = current.shape
    rhs = torch.zeros(size, d, dtype=torch.float64, device=targets.device)
    rhs.index_add_(0, codes, (_metric_dot(targets, metric) * weights[:, None]).double())
    if metric is None:
        mass = torch.zeros(size, dtype=torch.float64, device=targets.device)
        mass.index_add_(0, codes, weights.double())
        ridge = _RIDGE * float(mass.mean()) + 1e-30
        return ((rhs + ridge * current.double()) / (mass + ridge)[:, None]).to(current.dtype)
    in_groups = metric.shape[0]
    mass = torch.zeros(size * in_groups, dtype=torch.float64, device=targets.device)
    mass.index_add_(0, codes * in_groups + _group_index(codes.shape[0], metric, codes.device), weights.double())
    system = (mass.view(size, in_groups) @ metric.double().reshape(in_groups, d * d)).view(size, d, d)
    ridge = _RIDGE * float(system.diagonal(dim1=1, dim2=2).mean()) + 1e-30
    system += ridge * torch.eye(d, dtype=torch.float64, device=targets.device)
    solution = torch.linalg.solve(system, (rhs + ridge * current.double()).unsqueeze(-1)).squeeze(-1)
    return solution.to(current.dtype)


def _spd_solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a symmetric positive definite system (Cholesky; LU if the factorisation fails)."""
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(system, rhs)


def _refit_joint(
    values: torch.Tensor,
    codes: torch.Tensor,
    weights: torch.Tensor,
    metric: torch.Tensor | None,
    codebooks: torch.Tensor,
) -> torch.Tensor:
    """Least squares over all codebooks at once (one dense system of ``C*K`` (x ``d``) unknowns)."""
    num_codebooks, size, d = codebooks.shape
    total = num_codebooks * size
    device = values.device
    flat = codes + torch.arange(num_codebooks, device=device) * size  # [N, C]
    rhs = torch.zeros(total, d, dtype=torch.float64, device=device)
    projected = (_metric_dot(values, metric) * weights[:, None]).double()
    for c in range(num_codebooks):
        rhs.index_add_(0, flat[:, c], projected)
    pairs = (flat[:, :, None] * total + flat[:, None, :]).reshape(flat.shape[0], -1)  # [N, C*C]
    pair_weights = weights.double().repeat_interleave(num_codebooks**2)
    current = codebooks.reshape(total * d).double()
    if metric is None:
        gram = torch.zeros(total * total, dtype=torch.float64, device=device)
        gram.index_add_(0, pairs.reshape(-1), pair_weights)
        gram = gram.view(total, total)
        ridge = _RIDGE * float(gram.diagonal().mean()) + 1e-30
        gram.diagonal().add_(ridge)
        solution = _spd_solve(gram, rhs + ridge * current.view(total, d))
        return solution.to(codebooks.dtype).view(num_codebooks, size, d)
    # Sum the weights of each (input group, entry pair) that occurs (few of all possible ones), then add each
    # sum times its group's metric to the [total * total, d * d] system.
    in_idx = _group_index(flat.shape[0], metric, device)
    keys, where = torch.unique((in_idx[:, None] * (total * total) + pairs).reshape(-1), return_inverse=True)
    key_weights = torch.zeros(keys.shape[0], dtype=torch.float64, device=device).index_add_(0, where, pair_weights)
    terms = key_weights[:, None] * metric.double().reshape(metric.shape[0], d * d)[keys // (total * total)]
    system = torch.zeros(total * total, d * d, dtype=torch.float64, device=device)
    system.index_add_(0, keys % (total * total), terms)
    system = system.view(total, total, d, d).permute(0, 2, 1, 3).reshape(total * d, total * d)
    ridge = _RIDGE * float(system.diagonal().mean()) + 1e-30
    system.diagonal().add_(ridge)
    solution = _spd_solve(system, rhs.reshape(-1, 1) + ridge * current.unsqueeze(1))
    return solution.to(codebooks.dtype).view(num_codebooks, size, d)


def _num_cells(size: int) -> int:
    """Cells of the inverted-file search for a codebook of ``size`` entries (1: exhaustive search)."""
    return 1 if size <= _EXHAUSTIVE_LIMIT else 2 ** (size.bit_length() // 2)


def _kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    metric: torch.Tensor | None,
    size: int,
    iters: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means with ``size`` centroids: returns ``(centroids [size, d], codes [N])``.

    Seeds are a weighted sample of distinct points. With no more points than centroids every point becomes an
    entry (an exact fit) and the remaining entries copy points. Large codebooks are built as ``cells`` blocks:
    k-means into cells, then k-means inside each cell (ignoring the metric), so that :func:`_cell_search` works.
    """
    count = points.shape[0]
    device = points.device
    if count <= size:
        extra = torch.randint(count, (size - count,), generator=generator, device=generator.device).to(device)
        order = torch.cat([torch.arange(count, device=device), extra])
        return points[order].clone(), torch.arange(count, device=device)
    cells = _num_cells(size)
    if cells > 1:
        per_cell = size // cells
        coarse, cell_codes = _kmeans(points, weights, metric, cells, iters, generator)
        return _cell_kmeans(points, weights, cell_codes, coarse, per_cell, min(iters, 2), generator)
    mass = weights.double().to(generator.device)
    seeds = torch.multinomial(mass / mass.sum(), size, replacement=False, generator=generator).to(device)
    centroids = points[seeds].clone()
    codes = _nearest(points, centroids, metric)
    for _ in range(iters):
        centroids = _refit_entries(points, codes, weights, metric, centroids)
        new_codes = _nearest(points, centroids, metric)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    return centroids, codes


def _beam_search(
    values: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    metric: torch.Tensor | None,
    beam_size: int,
) -> torch.Tensor:
    """Codes ``[N, C]`` for additive ``codebooks`` ``[C, K, d]`` by beam search, starting from ``codes``.

    Each step replaces one codebook's code in every beam by each of the ``K`` entries and keeps the
    ``beam_size`` best tuples; the starting tuple is always a candidate, so the error never grows.
    """
    num_codebooks, size, d = codebooks.shape
    norms = [_entry_norms(codebooks[c], metric) for c in range(num_codebooks)]
    in_groups = norms[0].shape[0]
    ones = torch.ones(1, size, dtype=codebooks.dtype, device=codebooks.device)
    augmented = [torch.cat([-2.0 * codebooks[c].T, ones, norms[c]]) for c in range(num_codebooks) if in_groups == 1]
    result = codes.clone()
    step = _chunk_rows(values.shape[0], beam_size * size, in_groups, _search_chunk_elements())
    for start in range(0, values.shape[0], step):
        sl = slice(start, start + step)
        target = values[sl]
        beams = codes[sl].unsqueeze(1)  # [n, B, C]
        recon = _reconstruct_beams(beams, codebooks)  # [n, B, d]
        for c in range(num_codebooks):
            partial = recon - codebooks[c][beams[..., c]]
            residual = target.unsqueeze(1) - partial
            projected = _metric_dot(residual, metric)
            base = (residual * projected).sum(-1, keepdim=True)  # [n, B, 1]
            if in_groups == 1:  # [M r, base, 1] @ [-2 E; 1; ||E||²]: the scores in one product, one pass
                lhs = torch.cat([projected, base, torch.ones_like(base)], -1)
                scores = (lhs @ augmented[c]).view(projected.shape[0], -1, size)
            else:
                scores = (projected @ codebooks[c].T).view(-1, in_groups, projected.shape[1], size)
                scores = scores.mul_(-2.0).add_(norms[c].unsqueeze(1)).view(projected.shape[0], -1, size) + base
            flat = scores.reshape(scores.shape[0], -1)
            if c == num_codebooks - 1:  # only the best tuple is kept in the end: an argmin, not a top-k
                best = flat.argmin(dim=1, keepdim=True)
            else:
                best = flat.topk(min(beam_size, flat.shape[1]), dim=1, largest=False).indices
            source, entry = best // size, best % size
            beams = torch.gather(beams, 1, source.unsqueeze(-1).expand(-1, -1, num_codebooks)).clone()
            beams[..., c] = entry
            partial = torch.gather(partial, 1, source.unsqueeze(-1).expand(-1, -1, d))
            recon = partial + codebooks[c][entry]
        result[sl] = beams[:, 0]
    return result


def _reconstruct_beams(beams: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    recon = codebooks[0][beams[..., 0]]
    for c in range(1, codebooks.shape[0]):
        recon = recon + codebooks[c][beams[..., c]]
    return recon


def _search_codes(
    values: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    metric: torch.Tensor | None,
    beam_size: int,
) -> torch.Tensor:
    """New codes ``[N, C]``: never worse than ``codes`` for the given codebooks."""
    num_codebooks, size, _ = codebooks.shape
    cells = _num_cells(size)
    if cells == 1 and num_codebooks > 1:
        return _beam_search(values, codes, codebooks, metric, beam_size)
    if cells == 1:
        return _nearest(values, codebooks[0], metric).unsqueeze(1)
    codes = codes.clone()  # large codebooks: one codebook at a time, inverted-file search, keep the better code
    for c in range(num_codebooks):
        target = values - (_reconstruct(codes, codebooks) - codebooks[c][codes[:, c]])
        found = _cell_search(target, codebooks[c], metric, cells, _PROBES)
        better = _distances(target, codebooks[c][found], metric) < _distances(target, codebooks[c][codes[:, c]], metric)
        codes[:, c] = torch.where(better, found, codes[:, c])
    return codes


def _refit_codebooks(
    values: torch.Tensor,
    codes: torch.Tensor,
    weights: torch.Tensor,
    metric: torch.Tensor | None,
    codebooks: torch.Tensor,
) -> torch.Tensor:
    num_codebooks, size, d = codebooks.shape
    if num_codebooks > 1 and num_codebooks * size * (d if metric is not None else 1) <= _DENSE_SOLVE_LIMIT:
        return _refit_joint(values, codes, weights, metric, codebooks)
    codebooks = codebooks.clone()
    for _ in range(1 if num_codebooks == 1 else 2):  # block coordinate descent over codebooks
        for c in range(num_codebooks):
            others = _reconstruct(codes, codebooks) - codebooks[c][codes[:, c]]
            codebooks[c] = _refit_entries(values - others, codes[:, c], weights, metric, codebooks[c])
    return codebooks


def _reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The unscaled group vectors ``[N, d]`` that ``codes`` ``[N, C]`` select from ``codebooks`` ``[C, K, d]``."""
    return _reconstruct_beams(codes, codebooks)


def _refit_scales(
    groups: torch.Tensor, recon: torch.Tensor, blocks: torch.Tensor | None, scales: torch.Tensor
) -> torch.Tensor:
    """Least-squares scale per output group given the unscaled reconstruction (``[O, I, d]`` both)."""
    projected = recon if blocks is None else torch.einsum("ide,oie->oid", blocks, recon)
    num = (groups * projected).sum((1, 2))
    den = (recon * projected).sum((1, 2))
    fresh = num / den.clamp_min(1e-30)
    keep = (den <= 1e-30) | (fresh.abs() <= 1e-12 * scales.abs()) | ~torch.isfinite(fresh)
    return torch.where(keep, scales, fresh)


def _damped(stats: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``XᵀX`` made symmetric plus ``damp`` on its diagonal (float64), and ``damp = _DAMP * mean(diag)``."""
    stats = stats.double()
    hess = (stats + stats.T) / 2
    damp = _DAMP * float(hess.diagonal().mean().clamp_min(1e-30))
    return hess + damp * torch.eye(hess.shape[0], dtype=hess.dtype, device=hess.device), damp


def _diagonal_blocks(matrix: torch.Tensor, count: int, size: int) -> torch.Tensor:
    """The ``count`` diagonal ``[size, size]`` blocks of a square matrix: ``[count, size, size]``."""
    index = torch.arange(count, device=matrix.device)
    return matrix.view(count, size, count, size)[index, :, index, :]


def _group_metric(hess: torch.Tensor, damp: float, in_groups: int, ig: int, og: int) -> torch.Tensor:
    """The diagonal blocks of the damped ``XᵀX`` (:func:`_damped`) as one ``[d, d]`` metric per input group
    (``I_og ⊗ H_ii``)."""
    blocks = _diagonal_blocks(hess, in_groups, ig)  # [I, ig, ig]
    eye = torch.eye(og, dtype=hess.dtype, device=hess.device)
    metric = torch.einsum("ab,ice->iaebc", eye, blocks).reshape(in_groups, og * ig, og * ig)
    return (metric / damp).float()  # any positive factor leaves every argmin and solution unchanged


def _sweep_codes(
    groups: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    hess: torch.Tensor,
    beam_size: int,
) -> torch.Tensor:
    """One pass of exact coordinate descent on the output error ``(W - Ŵ) H (W - Ŵ)ᵀ``, one input group at a time.

    The search works with each group's diagonal block of ``H`` only; this pass accounts for how groups interact:
    with the gradient ``G = (W - Ŵ) H`` kept up to date, the best codes for group ``j`` are those nearest (in the
    metric ``H_jj``) to ``Ŵ_j + G_j H_jj⁻¹``, as in GPTQ's error feedback. The current codes are candidates, so the
    error never grows. Rows are output groups of one row (``out_group_size`` 1).
    """
    out_features, in_groups, d = groups.shape
    num_codebooks = codebooks.shape[0]
    codes = codes.view(out_features, in_groups, num_codebooks).clone()
    scale = scales.double()[:, None]
    approx = (
        _reconstruct(codes.view(-1, num_codebooks), codebooks).double().view(out_features, -1, d) * scale[..., None]
    )
    approx = approx.view(out_features, in_groups * d)
    grad = (groups.reshape(out_features, -1).double() - approx) @ hess
    blocks = _diagonal_blocks(hess, in_groups, d)
    inverses = torch.linalg.inv(blocks)
    step = max(1, _SWEEP_COLUMNS // d)
    for first in range(0, in_groups, step):  # GPTQ's lazy batches: the rest of G is updated once per batch
        cols = slice(first * d, min(first + step, in_groups) * d)
        local = grad[:, cols].clone()
        before = approx[:, cols].clone()
        for j in range(first, min(first + step, in_groups)):
            sl, at = slice(j * d, (j + 1) * d), slice((j - first) * d, (j - first + 1) * d)
            target = approx[:, sl] + local[:, at] @ inverses[j]
            found = _beam_search((target / scale).float(), codes[:, j], codebooks, blocks[j].float()[None], beam_size)
            fresh = _reconstruct(found, codebooks).double() * scale
            local -= (fresh - approx[:, sl]) @ hess[sl, cols]
            approx[:, sl] = fresh
            codes[:, j] = found
        rest = slice(cols.stop, None)
        grad[:, rest] -= (approx[:, cols] - before) @ hess[cols, rest]
    return codes.view(-1, num_codebooks)


def _full_refit(
    groups: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    hess: torch.Tensor,
    og: int,
    ig: int,
    steps: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks (a few conjugate-gradient steps: they converge fast), then scales, refit against ``hess``, the
    damped ``XᵀX`` (:func:`_damped`), i.e. against the exact output error. The result is kept only if that drops.
    """
    num_codebooks, size, d = codebooks.shape
    out_groups, in_groups, _ = groups.shape
    in_features = in_groups * ig
    flat = (codes + torch.arange(num_codebooks, device=codes.device) * size).T.reshape(-1)  # [C*N]
    target = groups.double().view(out_groups, in_groups, og, ig).permute(0, 2, 1, 3).reshape(-1, in_features)

    def dense(books: torch.Tensor, scl: torch.Tensor) -> torch.Tensor:
        grouped = books[flat].view(num_codebooks, out_groups, in_groups, d).sum(0) * scl[:, None, None]
        return grouped.view(out_groups, in_groups, og, ig).permute(0, 2, 1, 3).reshape(-1, in_features)

    def adjoint(matrix: torch.Tensor, scl: torch.Tensor) -> torch.Tensor:
        grouped = matrix.view(out_groups, og, in_groups, ig).permute(0, 2, 1, 3).reshape(out_groups, in_groups, d)
        grouped = (grouped * scl[:, None, None]).reshape(-1, d).repeat(num_codebooks, 1)
        return torch.zeros(num_codebooks * size, d, dtype=matrix.dtype, device=matrix.device).index_add_(
            0, flat, grouped
        )

    def error(books: torch.Tensor, scl: torch.Tensor) -> float:
        delta = target - dense(books, scl)
        return float(((delta @ hess) * delta).sum())

    scl = scales.double()
    start = codebooks.double().reshape(num_codebooks * size, d)
    ridge = _RIDGE * float(hess.diagonal().mean()) * float(scl.pow(2).mean())
    x = start.clone()
    residual = adjoint(target @ hess, scl) - adjoint(dense(x, scl) @ hess, scl) - ridge * (x - start)
    direction = residual.clone()
    rr = float((residual * residual).sum())
    for _ in range(steps):
        if rr <= 1e-30:
            break
        applied = adjoint(dense(direction, scl) @ hess, scl) + ridge * direction
        alpha = rr / max(float((direction * applied).sum()), 1e-300)
        x += alpha * direction
        residual -= alpha * applied
        rr_new = float((residual * residual).sum())
        direction = residual + (rr_new / rr) * direction
        rr = rr_new
    books = x
    recon = dense(books, torch.ones_like(scl))
    num = ((target @ hess) * recon).sum(1).view(out_groups, og).sum(1)
    den = ((recon @ hess) * recon).sum(1).view(out_groups, og).sum(1)
    fresh = torch.where(den > 1e-30, num / den.clamp_min(1e-30), scl)
    if error(books, fresh) < error(start, scl):
        return books.view(num_codebooks, size, d).to(codebooks.dtype), fresh.to(scales.dtype)
    return codebooks, scales


def encode_linear(
    weight: torch.Tensor,
    config: ConfigLike,
    *,
    input_stats: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    rounds: int = 3,
    beam_size: int = 4,
    kmeans_iters: int = 8,
    sweeps: int = 2,
) -> EncodedLinear:
    """Encode a dense ``[out_features, in_features]`` weight in the AQLM format of ``config``.

    Args:
        weight: 2-D floating weight (``nn.Linear.weight`` layout). Not modified.
        config: anything :func:`aqlm_ctx.config.as_config` accepts; its format fields and ``dtype`` are used.
        input_stats: optional ``[in_features, in_features]`` second moment ``XᵀX`` of the layer's inputs; the
            objective becomes the output error ``||(W - Ŵ)X||²``: the search uses each input group's diagonal
            block of ``XᵀX``, then codebooks and scales are refit against all of it, and ``sweeps`` passes
            update the codes group by group against all of it too.
        generator: source of randomness (k-means seeding); ``None`` uses a fresh generator seeded with 0, so
            the result is deterministic either way.
        rounds: alternations of code search, codebook least squares and scale refit after initialisation.
        beam_size: beams kept per group by the search over additive codebooks (ignored for one codebook).
        kmeans_iters: Lloyd iterations of each residual k-means at initialisation.
        sweeps: with ``input_stats``, passes over the input groups that update each group's codes against the full
            ``XᵀX`` (GPTQ-style error feedback: later groups make up for the errors of earlier ones), each followed
            by the full refit; for codebooks of up to 4096 entries and ``out_group_size`` 1 (else none).

    Returns:
        An :class:`EncodedLinear`: codes int8 (nbits <= 8) or int16, codebooks and scales in ``config.dtype``
        or, when that is ``None``, ``weight.dtype``; all on ``weight.device``.

    Raises:
        TypeError: ``weight``/``input_stats`` is not a floating tensor, or ``generator`` is not a Generator.
        ValueError: ``weight`` is not 2-D, its shape does not divide by the group sizes, ``input_stats`` is not
            ``[in_features, in_features]`` or not finite, ``rounds``/``beam_size``/``kmeans_iters``/``sweeps``
            out of range.

    Example:
        >>> enc = encode_linear(torch.randn(64, 64), {"num_codebooks": 2, "nbits_per_codebook": 8})
        >>> enc.codes.shape, enc.codebooks.shape, enc.scales.shape
        (torch.Size([64, 8, 2]), torch.Size([2, 256, 1, 8]), torch.Size([64, 1, 1, 1]))
    """
    cfg = as_config(config)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device: it has no values to encode")
    out_features, in_features = weight.shape
    _check_shape(out_features, in_features, cfg)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"weight of shape {list(weight.shape)} has NaN or infinite values")
    check_encode_options(rounds=rounds, beam_size=beam_size, kmeans_iters=kmeans_iters, sweeps=sweeps)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    og, ig, num_codebooks, size = cfg.out_group_size, cfg.in_group_size, cfg.num_codebooks, cfg.codebook_size
    out_groups, in_groups, d = out_features // og, in_features // ig, og * ig
    device = weight.device
    hess: torch.Tensor | None = None  # the damped XᵀX (float64)
    damp = 0.0
    if input_stats is not None:
        if not isinstance(input_stats, torch.Tensor) or not input_stats.dtype.is_floating_point:
            raise TypeError(
                f"input_stats must be a floating torch.Tensor (XᵀX), got {type(input_stats).__name__}"
                + (f" of dtype {input_stats.dtype}" if isinstance(input_stats, torch.Tensor) else "")
            )
        if tuple(input_stats.shape) != (in_features, in_features):
            raise ValueError(
                f"input_stats must have shape [in_features, in_features] = [{in_features}, {in_features}] for "
                f"weight shape {list(weight.shape)}, got {list(input_stats.shape)}"
            )
        if not bool(torch.isfinite(input_stats).all()):
            raise ValueError("input_stats has NaN or infinite values")
        hess, damp = _damped(input_stats.detach().to(device=device, dtype=torch.float64))
    out_dtype = cfg.dtype or weight.dtype

    w32 = weight.detach().float()
    groups = w32.view(out_groups, og, in_groups, ig).permute(0, 2, 1, 3).reshape(out_groups, in_groups, d)
    scales = groups.pow(2).mean((1, 2)).sqrt()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    metric = None if hess is None else _group_metric(hess, damp, in_groups, ig, og)

    def normalised(scl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = (groups / scl[:, None, None]).reshape(-1, d)
        return values, scl.pow(2).repeat_interleave(in_groups)

    values, weights = normalised(scales)
    residual = values
    books, code_list = [], []
    for _ in range(num_codebooks):
        book, code = _kmeans(residual, weights, metric, size, kmeans_iters, generator)
        books.append(book)
        code_list.append(code)
        residual = residual - book[code]
    codebooks = torch.stack(books)
    codes = torch.stack(code_list, dim=1)

    exact = out_groups * in_groups <= size  # every group is an entry of the first codebook: nothing to improve
    for _ in range(0 if exact else rounds):
        codes = _search_codes(values, codes, codebooks, metric, beam_size)
        codebooks = _refit_codebooks(values, codes, weights, metric, codebooks)
        recon = _reconstruct(codes, codebooks).view(out_groups, in_groups, d)
        scales = _refit_scales(groups, recon, metric, scales)
        values, weights = normalised(scales)
    if hess is not None and not exact:
        codebooks, scales = _full_refit(groups, codes, codebooks, scales, hess, og, ig)
        for _ in range(sweeps if og == 1 and size <= _EXHAUSTIVE_LIMIT else 0):
            codes = _sweep_codes(groups, codes, codebooks, scales, hess, beam_size)
            codebooks, scales = _full_refit(groups, codes, codebooks, scales, hess, og, ig)

    stored = codes.view(out_groups, in_groups, num_codebooks)
    stored = torch.where(stored >= 2 ** (cfg.nbits_per_codebook - 1), stored - size, stored).to(cfg.code_dtype)
    return EncodedLinear(
        codes=stored.contiguous(),
        codebooks=codebooks.view(num_codebooks, size, og, ig).to(out_dtype).contiguous(),
        scales=scales.view(out_groups, 1, 1, 1).to(out_dtype).contiguous(),
    )

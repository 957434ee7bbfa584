"""aqlm_ctx's Triton and CUDA C++ kernels against plain-torch dequantized references (GPU), plus CPU-side guards."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from aqlm_ctx.kernels import triton_kernels

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# name -> (num_codebooks, nbits, codes dtype)
FORMATS = {"2x8": (2, 8, torch.int8), "1x8": (1, 8, torch.int8), "1x16": (1, 16, torch.int16)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_layer(
    fmt: str, out_features: int, in_features: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes (full unsigned range, stored signed), codebooks and scales in the checkpoint layout."""
    num_codebooks, nbits, codes_dtype = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    half = 2 ** (nbits - 1)
    codes = torch.randint(-half, half, (out_features, in_features // 8, num_codebooks), generator=g)
    codebooks = torch.randn(num_codebooks, 2**nbits, 1, 8, generator=g) * 0.5
    scales = torch.rand(out_features, 1, 1, 1, generator=g) + 0.5
    return codes.to(codes_dtype).to(device), codebooks.to(dtype).to(device), scales.to(dtype).to(device)


def reference(
    x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Independent oracle: explicit per-codebook lookup in float64, then a float64 matmul."""
    num_codebooks, codebook_size = codebooks.shape[:2]
    idx = codes.long() % codebook_size
    weight = torch.zeros(codes.shape[0], codes.shape[1], 8, dtype=torch.float64, device=codes.device)
    for c in range(num_codebooks):
        weight += codebooks[c, :, 0, :].double()[idx[:, :, c]]
    weight = (weight * scales.double().view(-1, 1, 1)).reshape(codes.shape[0], -1)
    out = x.double() @ weight.T
    if bias is not None:
        out = out + bias.double()
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------- CPU side (runs everywhere)


def test_supports_is_false_on_cpu() -> None:
    for fmt in FORMATS:
        codes, codebooks, _ = make_layer(fmt, 16, 64, torch.float16, "cpu")
        x = torch.randn(3, 64, dtype=torch.float16)
        assert not triton_kernels.supports(x, codes, codebooks)


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "aqlm_ctx.kernels.triton_aqlm", raising=False)
    module = importlib.import_module("aqlm_ctx.kernels.triton_kernels")
    codes, codebooks, _ = make_layer("2x8", 16, 64, torch.float16, "cpu")
    assert not module.supports(torch.randn(1, 64, dtype=torch.float16), codes, codebooks)
    with pytest.raises(ImportError):
        importlib.import_module("aqlm_ctx.kernels.triton_aqlm")


def test_fake_impl_shape() -> None:
    codes, codebooks, scales = make_layer("2x8", 24, 64, torch.float16, "meta")
    x = torch.empty(2, 5, 64, dtype=torch.float16, device="meta")
    out = torch.ops.aqlm_ctx.aqlm_matmul(x, codes, codebooks, scales, None)
    assert out.shape == (2, 5, 24) and out.dtype == torch.float16


# ---------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_supports_covered_and_not(fmt: str) -> None:
    codes, codebooks, _ = make_layer(fmt, 32, 64, torch.float16, "cuda")
    low, high = triton_kernels.TOKEN_RANGES[(codebooks.shape[0], codebooks.shape[1])]
    x = torch.randn(max(low, 1), 64, device="cuda", dtype=torch.float16)
    assert triton_kernels.supports(x, codes, codebooks) == (low <= high)
    assert not triton_kernels.supports(torch.randn(2, 64, device="cuda"), codes, codebooks)  # fp32 input
    wide = codebooks.new_zeros(codebooks.shape[0], codebooks.shape[1], 1, 16)
    assert not triton_kernels.supports(torch.randn(2, 64, device="cuda", dtype=torch.float16), codes, wide)
    two_out = codebooks.new_zeros(codebooks.shape[0], codebooks.shape[1], 2, 8)
    assert not triton_kernels.supports(torch.randn(2, 64, device="cuda", dtype=torch.float16), codes, two_out)


@requires_cuda
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("tokens", [1, 3, 7, 17, 65, 513])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(fmt: str, dtype_name: str, tokens: int, with_bias: bool) -> None:
    dtype = DTYPES[dtype_name]
    out_features, in_features = 200, 8 * 67  # neither divides any tile size
    codes, codebooks, scales = make_layer(fmt, out_features, in_features, dtype, "cuda", seed=tokens)
    codes_before = codes.clone()
    bias = torch.randn(out_features, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    low, high = triton_kernels.TOKEN_RANGES[(codebooks.shape[0], codebooks.shape[1])]
    covered = low <= tokens <= high
    assert triton_kernels.supports(x, codes, codebooks) == covered
    out = triton_kernels.matmul(x, codes, codebooks, scales, bias)
    assert out.shape == (tokens, out_features) and out.dtype == dtype
    assert rel_err(out, reference(x, codes, codebooks, scales, bias)) < TOLERANCE[dtype]
    assert torch.equal(codes, codes_before)


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_llama_sized_layer(fmt: str, tokens: int) -> None:
    codes, codebooks, scales = make_layer(fmt, 1024, 4096, torch.float16, "cuda", seed=1)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.float16)
    out = triton_kernels.matmul(x, codes, codebooks, scales, None)
    assert rel_err(out, reference(x, codes, codebooks, scales, None)) < TOLERANCE[torch.float16]


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_3d_and_non_contiguous_inputs(fmt: str) -> None:
    codes, codebooks, scales = make_layer(fmt, 96, 128, torch.float16, "cuda", seed=3)
    bias = torch.randn(96, device="cuda", dtype=torch.float16)
    x3 = torch.randn(2, 5, 128, device="cuda", dtype=torch.float16)
    out = triton_kernels.matmul(x3, codes, codebooks, scales, bias)
    assert out.shape == (2, 5, 96)
    ref = reference(x3.reshape(-1, 128), codes, codebooks, scales, bias).view(2, 5, 96)
    assert rel_err(out, ref) < TOLERANCE[torch.float16]
    wide = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    for x in (wide[:, ::2], wide[:, :128], torch.randn(128, 3, device="cuda", dtype=torch.float16).T):
        assert not x.is_contiguous()
        out = triton_kernels.matmul(x, codes, codebooks, scales, bias)
        assert rel_err(out, reference(x, codes, codebooks, scales, bias)) < TOLERANCE[torch.float16]
    empty = triton_kernels.matmul(x3[:0], codes, codebooks, scales, bias)
    assert empty.shape == (0, 5, 96)


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("bt", [0, 16, 64])
def test_split_k_is_exact_and_deterministic(fmt: str, bt: int) -> None:
    """Forced split-K: the self-resetting ticket must reduce every partial, the same way every time."""
    from aqlm_ctx.kernels.triton_aqlm import Config, launch

    codes, codebooks, scales = make_layer(fmt, 256, 8 * 515, torch.float16, "cuda", seed=5)
    bias = torch.randn(256, device="cuda", dtype=torch.float16)
    tokens = 3 if bt == 0 else 2 * bt + 1
    x = torch.randn(tokens, 8 * 515, device="cuda", dtype=torch.float16)
    ref = reference(x, codes, codebooks, scales, bias)
    for split in (2, 7):
        cfg = Config(bt=bt, bo=32, bi=8, split=split)
        outs = [launch(x, codes, codebooks, scales, bias, cfg) for _ in range(20)]
        assert rel_err(outs[0], ref) < TOLERANCE[torch.float16]
        assert all(torch.equal(o, outs[0]) for o in outs[1:])


@requires_cuda
def test_quantized_linear_dispatches_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    aqlm = pytest.importorskip("aqlm")
    from aqlm_ctx.kernels.dispatch import install_kernels

    layer = aqlm.QuantizedLinear(256, 64, 8, 1, 1, 16, bias=True, device="cuda", dtype=torch.float16)
    codes, codebooks, scales = make_layer("1x16", 64, 256, torch.float16, "cuda", seed=7)
    with torch.no_grad():
        layer.codes.copy_(codes)
        layer.codebooks.copy_(codebooks)
        layer.scales.copy_(scales)
        layer.bias.copy_(torch.randn(64))
    install_kernels(layer)
    calls: list[int] = []
    real = triton_kernels.matmul
    monkeypatch.setattr(triton_kernels, "matmul", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(40, 256, device="cuda", dtype=torch.float16)  # 1x16: CUDA decode up to 32 tokens, Triton above
    with torch.no_grad():
        out = layer(x)
    assert calls
    assert rel_err(out, reference(x, codes, codebooks, scales, layer.bias)) < TOLERANCE[torch.float16]


@requires_cuda
@pytest.mark.parametrize("fmt", ["2x8", "1x16"])
def test_torch_compile(fmt: str) -> None:
    codes, codebooks, scales = make_layer(fmt, 128, 256, torch.bfloat16, "cuda", seed=11)
    bias = torch.randn(128, device="cuda", dtype=torch.bfloat16)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(triton_kernels.matmul(x, codes, codebooks, scales, bias)) * 2

    compiled = torch.compile(f, fullgraph=True)
    for tokens in (1, 5, 33):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
        ref = torch.relu(reference(x, codes, codebooks, scales, bias)) * 2
        assert rel_err(compiled(x), ref) < TOLERANCE[torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_graph_capture(fmt: str, tokens: int) -> None:
    codes, codebooks, scales = make_layer(fmt, 512, 1024, torch.float16, "cuda", seed=13)
    bias = torch.randn(512, device="cuda", dtype=torch.float16)
    static_x = torch.randn(tokens, 1024, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (compilation, split-K counters) outside the capture
            triton_kernels.matmul(static_x, codes, codebooks, scales, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = triton_kernels.matmul(static_x, codes, codebooks, scales, bias)
    for _ in range(3):
        static_x.copy_(torch.randn(tokens, 1024, device="cuda", dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, reference(static_x, codes, codebooks, scales, bias)) < TOLERANCE[torch.float16]


# ---------------------------------------------------------------- CUDA C++ decode kernels (2x8, 1x8; 1x16 below)

DECODE_FORMATS = ["2x8", "1x8"]


def decode_reference(
    x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """float64 ``x @ W.T + bias`` with ``W`` from aqlm_ctx's plain-torch dequantization."""
    from aqlm_ctx.kernels.reference import dequantize_weight

    out = x.double() @ dequantize_weight(codes, codebooks.double(), scales.double()).T
    return out if bias is None else out + bias.double()


def test_cuda_decode_build_failure_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No nvcc (or any build error): one warning, then None, never an exception."""
    import torch.utils.cpp_extension

    from aqlm_ctx.kernels import cuda_kernels

    def broken_load(*args: object, **kwargs: object) -> None:
        raise OSError("nvcc not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    monkeypatch.setattr(cuda_kernels, "_arch", lambda device: "test")
    monkeypatch.setattr(cuda_kernels, "_MODULES", {})
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cuda_kernels.build(torch.device("cuda")) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_kernels.build(torch.device("cuda")) is None


def test_cuda_decode_declines_cpu_tensors() -> None:
    from aqlm_ctx.kernels import cuda_kernels

    for fmt in DECODE_FORMATS:
        codes, codebooks, scales = make_layer(fmt, 16, 128, torch.float16, "cpu")
        assert not cuda_kernels.supports(torch.randn(1, 128, dtype=torch.float16), codes, codebooks, scales, None)


def test_cuda_decode_plan() -> None:
    from aqlm_ctx.kernels.cuda_kernels import (
        CLUSTER_MAX_GROUPS,
        CLUSTER_SPLITS,
        CLUSTER_TOKENS,
        CTAS_PER_SM,
        MAX_CLUSTER,
        ROWS_PER_CTA,
        SUM_KERNEL_TOKENS,
        X_WINDOW_BYTES,
        plan,
    )

    for tokens in (1, 7, 16, 32):
        for out_f, groups, c in ((4096, 512, 2), (8192, 3584, 2), (28672, 1024, 1), (28672, 1024, 2), (300, 80, 1)):
            superstep = 64 // c
            row_blocks = -(-out_f // ROWS_PER_CTA)
            units = row_blocks * -(-groups // superstep)
            ctas, per_split, window, cluster, sum_kernel = plan(tokens, out_f, groups, c, 132)
            assert window % superstep == 0 and (window == superstep or tokens * window * 18 <= X_WINDOW_BYTES)
            assert cluster == 1 and sum_kernel == (tokens >= SUM_KERNEL_TOKENS)
            if per_split:  # split-K: whole row blocks' splits
                assert per_split % superstep == 0 and ctas == row_blocks * -(-groups // per_split)
                assert 0 < window <= per_split
            else:  # stream-K over every SM
                assert ctas == min(units, CTAS_PER_SM * 132) and 0 < window <= -(-units // ctas) * superstep
            forced = plan(tokens, out_f, groups, c, 132, splits=3)
            assert forced.groups_per_split and forced.ctas == row_blocks * -(-groups // forced.groups_per_split)
            assert plan(tokens, out_f, groups, c, 132, ctas=7)[:2] == (min(units, 7), 0)
            # Clusters: planned for split-K at 9-32 tokens on layers of up to CLUSTER_MAX_GROUPS groups, one per row
            # block of at most CLUSTER_SPLITS splits; otherwise the plan is unchanged.
            clustered = plan(tokens, out_f, groups, c, 132, clusters=True)
            small = groups <= CLUSTER_MAX_GROUPS and 132 // row_blocks + 1 >= 4
            if per_split and CLUSTER_TOKENS[0] <= tokens <= CLUSTER_TOKENS[1] and small:
                count = -(-groups // clustered.groups_per_split)
                assert count <= CLUSTER_SPLITS and clustered.ctas == row_blocks * count
                assert clustered.cluster == (count if count > 1 else 1)
                assert clustered.sum_kernel == (clustered.cluster == 1)  # a cluster sums its own partials
            else:
                assert clustered == (ctas, per_split, window, 1, sum_kernel)
            many = plan(tokens, out_f, groups, c, 132, splits=MAX_CLUSTER + 1, clusters=True)
            assert many.cluster == (1 if many.ctas > MAX_CLUSTER * row_blocks else many.ctas // row_blocks)
    assert plan(1, 28672, 1024, 2, 132).groups_per_split == 0  # 112 row blocks: split-K leaves SMs half used
    assert plan(1, 8192, 3584, 2, 132).groups_per_split > 0  # 32 row blocks x 8 splits fill 256 of 264 slots
    assert plan(16, 4096, 512, 2, 132, clusters=True) == (96, 96, 96, 6, False)  # 16 row blocks x 6 splits, clusters
    assert plan(16, 8192, 3584, 2, 132, clusters=True).cluster == 1  # long splits: the workspace sum measured faster
    assert plan(16, 14336, 512, 2, 132, clusters=True).cluster == 1  # 56 row blocks: 3 splits a cluster, too few
    assert plan(16, 11008, 512, 2, 132, clusters=True).cluster == 4  # 43 row blocks: 4 splits


@requires_cuda
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 3, 7, 16, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_decode_matches_reference(fmt: str, dtype_name: str, tokens: int, with_bias: bool) -> None:
    from aqlm_ctx.kernels import cuda_kernels

    dtype = DTYPES[dtype_name]
    out_features, in_features = 300, 8 * 80  # a partial row block; a partial superstep in either format
    codes, codebooks, scales = make_layer(fmt, out_features, in_features, dtype, "cuda", seed=tokens)
    codes_before = codes.clone()
    bias = torch.randn(out_features, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    low, high = cuda_kernels.TOKEN_RANGES[codebooks.shape[0]]
    assert cuda_kernels.supports(x, codes, codebooks, scales, bias) == (low <= tokens <= high)
    ref = decode_reference(x, codes, codebooks, scales, bias)
    for splits in (0, 1, 2, 3):
        out = cuda_kernels.launch(x, codes, codebooks, scales, bias, splits=splits)
        assert out.shape == (tokens, out_features) and out.dtype == dtype
        assert rel_err(out, ref) < TOLERANCE[dtype], splits
        # Split-K partials summed in a thread-block cluster (sm_90+) or through the workspace: the same sum.
        assert torch.equal(out, cuda_kernels.launch(x, codes, codebooks, scales, bias, splits=splits, clusters=False))
    assert rel_err(cuda_kernels.matmul(x, codes, codebooks, scales, bias), ref) < TOLERANCE[dtype]
    assert torch.equal(codes, codes_before)


@requires_cuda
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_decode_large_layer_windows_and_splits(fmt: str, tokens: int) -> None:
    """Several x windows per CTA, several CTAs per row block and CTAs across row blocks: against the reference,
    deterministic."""
    from aqlm_ctx.kernels import cuda_kernels

    codes, codebooks, scales = make_layer(fmt, 1024, 8192, torch.float16, "cuda", seed=2)
    bias = torch.randn(1024, device="cuda", dtype=torch.float16)
    x = torch.randn(tokens, 8192, device="cuda", dtype=torch.float16)
    ref = decode_reference(x, codes, codebooks, scales, bias)
    # 4 row blocks x 32 (2x8) or 16 (1x8) supersteps: 7 and 13 CTAs take ranges that cross row blocks (stream-K)
    # 5 splits: one cluster per row block on sm_90+; 16: more than a cluster holds, summed through the workspace.
    for grid in dict(splits=1), dict(splits=5), dict(splits=16), dict(ctas=7), dict(ctas=13), dict(ctas=64):
        outs = [cuda_kernels.launch(x, codes, codebooks, scales, bias, **grid) for _ in range(10)]
        assert rel_err(outs[0], ref) < TOLERANCE[torch.float16], grid
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), grid
        # The workspace's partials summed by a second kernel or by the last CTA of each row block: the same sums, and
        # (split-K) the same as a cluster's.
        by_kernel, by_last_cta = (
            cuda_kernels.launch(x, codes, codebooks, scales, bias, clusters=False, sum_kernel=summed, **grid)
            for summed in (True, False)
        )
        assert torch.equal(by_kernel, by_last_cta) and torch.equal(by_kernel, outs[0]), grid


@requires_cuda
@pytest.mark.parametrize("fmt", [*DECODE_FORMATS, "1x16"])
def test_cuda_decode_3d_non_contiguous_and_misaligned_inputs(fmt: str) -> None:
    from aqlm_ctx.kernels import cuda_kernels

    matmul, supports = (
        (cuda_kernels.matmul_1x16, cuda_kernels.supports_1x16)
        if fmt == "1x16"
        else (cuda_kernels.matmul, cuda_kernels.supports)
    )
    codes, codebooks, scales = make_layer(fmt, 96, 256, torch.bfloat16, "cuda", seed=3)
    bias = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    x3 = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)
    out = matmul(x3, codes, codebooks, scales, bias)
    ref = decode_reference(x3.reshape(-1, 256), codes, codebooks, scales, bias).view(2, 3, 96)
    assert out.shape == (2, 3, 96) and rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    wide = torch.randn(3, 520, device="cuda", dtype=torch.bfloat16)
    for x in (wide[:, :512:2], wide[:, 1:257], torch.randn(256, 3, device="cuda", dtype=torch.bfloat16).T):
        assert not x.is_contiguous()
        assert supports(x, codes, codebooks, scales, bias)
        out = matmul(x, codes, codebooks, scales, bias)
        assert rel_err(out, decode_reference(x, codes, codebooks, scales, bias)) < TOLERANCE[torch.bfloat16]
    assert matmul(x3[:0], codes, codebooks, scales, bias).shape == (0, 3, 96)


@requires_cuda
def test_cuda_decode_declines_what_it_does_not_cover() -> None:
    from aqlm_ctx.kernels import cuda_kernels

    codes, codebooks, scales = make_layer("2x8", 32, 128, torch.float16, "cuda")
    x = torch.randn(1, 128, device="cuda", dtype=torch.float16)
    assert cuda_kernels.supports(x, codes, codebooks, scales, None)
    assert not cuda_kernels.supports(x.float(), codes, codebooks, scales, None)
    assert not cuda_kernels.supports(x, codes, codebooks.bfloat16(), scales, None)
    assert not cuda_kernels.supports(
        torch.randn(64, 128, device="cuda", dtype=torch.float16), codes, codebooks, scales, None
    )
    odd_codes, odd_codebooks, odd_scales = make_layer("2x8", 32, 8 * 12, torch.float16, "cuda")  # 24-byte rows
    assert not cuda_kernels.supports(x[:, :96], odd_codes, odd_codebooks, odd_scales, None)
    codes16, codebooks16, scales16 = make_layer("1x16", 32, 128, torch.float16, "cuda")
    assert not cuda_kernels.supports(x, codes16, codebooks16, scales16, None)


@requires_cuda
@pytest.mark.parametrize("fmt", [*DECODE_FORMATS, "1x16"])
def test_cuda_decode_graph_compile_and_dispatch(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA-graph capture, torch.compile(fullgraph), dispatch through aqlm.QuantizedLinear, the off switch and the
    build-failure fallback (Triton)."""
    aqlm = pytest.importorskip("aqlm")
    from aqlm_ctx.kernels import cuda_kernels, triton_kernels
    from aqlm_ctx.kernels.dispatch import install_kernels

    op_name = "matmul_1x16" if fmt == "1x16" else "matmul"
    op = getattr(cuda_kernels, op_name)
    codes, codebooks, scales = make_layer(fmt, 512, 1024, torch.float16, "cuda", seed=13)
    bias = torch.randn(512, device="cuda", dtype=torch.float16)
    static_x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    op(static_x, codes, codebooks, scales, bias)  # build and counters outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = op(static_x, codes, codebooks, scales, bias)
    for _ in range(3):
        static_x.copy_(torch.randn(4, 1024, device="cuda", dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, decode_reference(static_x, codes, codebooks, scales, bias)) < 4e-3

    compiled = torch.compile(lambda x: torch.relu(op(x, codes, codebooks, scales, bias)), fullgraph=True)
    for tokens in (1, 5):
        x = torch.randn(tokens, 1024, device="cuda", dtype=torch.float16)
        ref = torch.relu(decode_reference(x, codes, codebooks, scales, bias))
        assert rel_err(compiled(x), ref) < 4e-3

    num_codebooks, nbits = codebooks.shape[0], int(codebooks.shape[1]).bit_length() - 1
    layer = aqlm.QuantizedLinear(1024, 512, 8, 1, num_codebooks, nbits, bias=True, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer.codes.copy_(codes)
        layer.codebooks.copy_(codebooks)
        layer.scales.copy_(scales)
        layer.bias.copy_(bias)
    install_kernels(layer)
    calls: list[int] = []
    monkeypatch.setattr(cuda_kernels, op_name, lambda *a: calls.append(1) or op(*a))
    x = torch.randn(2, 1024, device="cuda", dtype=torch.float16)
    ref = decode_reference(x, codes, codebooks, scales, bias)
    with torch.no_grad():
        out = layer(x)
    assert calls and rel_err(out, ref) < 4e-3
    monkeypatch.setenv("AQLM_CTX_GPU_KERNELS", "0")
    with torch.no_grad():
        stock = layer(x)
    assert len(calls) == 1 and rel_err(stock, ref) < 4e-3
    monkeypatch.delenv("AQLM_CTX_GPU_KERNELS")
    monkeypatch.setitem(cuda_kernels._MODULES, cuda_kernels._arch(x.device), None)  # as if the build had failed
    triton_calls: list[int] = []
    real_triton = triton_kernels.matmul
    monkeypatch.setattr(triton_kernels, "matmul", lambda *a: triton_calls.append(1) or real_triton(*a))
    with torch.no_grad():
        fallback = layer(x)
    assert len(calls) == 1 and rel_err(fallback, ref) < 4e-3
    assert bool(triton_calls) == triton_kernels.supports(x, codes, codebooks)  # else aqlm's stock kernel
    assert fmt != "1x16" or triton_calls


# ---------------------------------------------------------------- CUDA C++ decode kernel for 1x16 (codebook via L1/L2)

GATHERS_1X16 = [0, 1, 2, 3]  # cuda_kernels.GATHER_L1, GATHER_L2, GATHER_SHARED, GATHER_CLUSTER


def gathers_1x16() -> list[int]:
    """The gather modes this GPU runs (GATHER_CLUSTER needs sm_90+)."""
    return GATHERS_1X16 if torch.cuda.get_device_capability() >= (9, 0) else GATHERS_1X16[:3]


def test_cuda_decode_1x16_plan() -> None:
    from aqlm_ctx.kernels.cuda_kernels import CLUSTER_1X16, GATHER_CLUSTER, GATHER_SHARED, _x_slots_1x16, plan_1x16

    for tokens in (1, 7, 16, 32):
        for out_f, groups in ((4096, 512), (8192, 3584), (28672, 1024), (300, 80), (16, 8)):
            for gather in (-1, 0, 1, 2, 3):
                for splits in (0, 1, 3):
                    p = plan_1x16(tokens, out_f, groups, 132, splits=splits, gather=gather)
                    tiles = p.splits * -(-out_f // (16 * p.warps))
                    assert p.groups_per_split % 32 == 0 and p.window_groups % 32 == 0
                    assert 0 < p.window_groups <= p.groups_per_split
                    assert p.splits == -(-groups // p.groups_per_split) and (p.splits - 1) * p.groups_per_split < groups
                    assert 1 <= p.warps <= 16 and 0 <= p.carveout <= 100
                    if gather in (GATHER_SHARED, GATHER_CLUSTER):
                        assert p.cache_entries > 0 and p.grid <= 132
                        assert (p.cache_entries + tokens * _x_slots_1x16(p.window_groups)) * 16 + 1024 <= 227 * 1024
                    else:
                        assert p.cache_entries == 0 and p.grid <= 132 * 16 // p.warps
                    if gather == GATHER_CLUSTER:  # whole clusters, at most one with no tile
                        assert p.grid % CLUSTER_1X16 == 0 and p.grid < tiles + CLUSTER_1X16
                        assert p.cache_entries * CLUSTER_1X16 <= 65536
                    else:
                        assert 1 <= p.grid <= tiles
                    capped = plan_1x16(tokens, out_f, groups, 132, splits, gather, 0, 227 * 1024, 228 * 1024, 1000)
                    assert capped.cache_entries == (768 if gather in (GATHER_SHARED, GATHER_CLUSTER) else 0)
    assert _x_slots_1x16(32) % 8 == 4 and _x_slots_1x16(896) >= 896 * 9 // 8
    # The default gather mode: the cluster's shared-memory copies for few tokens on the largest layers, where sm_90+.
    for tokens, out_f, groups, clusters, gather in (
        (1, 8192, 3584, True, GATHER_CLUSTER),
        (4, 28672, 1024, True, GATHER_CLUSTER),
        (5, 28672, 1024, True, 0),
        (1, 8192, 1024, True, 0),
        (1, 8192, 3584, False, 0),
    ):
        assert plan_1x16(tokens, out_f, groups, 132, clusters=clusters).gather == gather


@pytest.mark.parametrize(
    ("capability", "l2_mib", "expected"),
    [((9, 0), 50, True), ((9, 0), 60, False), ((8, 0), 40, False)],  # H100, H200, A100
)
def test_cuda_decode_1x16_clusters_only_where_l2_is_small(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], l2_mib: int, expected: bool
) -> None:
    """The cluster's codebook copies are planned on sm_90+ GPUs with at most 50 MiB of L2 (measured: they pay on an
    H100 and lose on an H200, whose larger L2 serves the gathers faster)."""
    from types import SimpleNamespace

    from aqlm_ctx.kernels import cuda_kernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    properties = SimpleNamespace(L2_cache_size=l2_mib << 20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: properties)
    assert cuda_kernels._clusters.__wrapped__(0) == (capability >= (9, 0))
    monkeypatch.setattr(cuda_kernels, "_clusters", cuda_kernels._clusters.__wrapped__)
    assert cuda_kernels._clusters_1x16.__wrapped__(0) is expected


def test_cuda_decode_1x16_declines_cpu_tensors() -> None:
    from aqlm_ctx.kernels import cuda_kernels

    codes, codebooks, scales = make_layer("1x16", 16, 128, torch.float16, "cpu")
    assert not cuda_kernels.supports_1x16(torch.randn(1, 128, dtype=torch.float16), codes, codebooks, scales, None)


@requires_cuda
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 3, 7, 16, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_decode_1x16_matches_reference(dtype_name: str, tokens: int, with_bias: bool) -> None:
    """Every gather mode, forced split counts and CTA sizes, against the plain-torch dequantized reference."""
    from aqlm_ctx.kernels import cuda_kernels

    dtype = DTYPES[dtype_name]
    out_features, in_features = 300, 8 * 80  # a partial row block, a partial superstep of 32 groups
    codes, codebooks, scales = make_layer("1x16", out_features, in_features, dtype, "cuda", seed=tokens)
    assert int(codes.min()) < -30000 and int(codes.max()) > 30000  # the full signed int16 range
    codes_before = codes.clone()
    bias = torch.randn(out_features, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    low, high = cuda_kernels.DECODE_1X16_TOKEN_RANGE
    assert cuda_kernels.supports_1x16(x, codes, codebooks, scales, bias) == (low <= tokens <= high)
    ref = decode_reference(x, codes, codebooks, scales, bias)
    for gather in gathers_1x16():
        for splits in (0, 1, 3):
            for warps in (0, 4):
                out = cuda_kernels.launch_1x16(x, codes, codebooks, scales, bias, splits, gather, warps)
                assert out.shape == (tokens, out_features) and out.dtype == dtype
                assert rel_err(out, ref) < TOLERANCE[dtype], (gather, splits, warps)
    # Small shared-memory caches: entries from this CTA's copy, the other cluster CTA's copy and global memory.
    for gather in gathers_1x16()[2:]:
        for entries in (256, 4096):
            out = cuda_kernels.launch_1x16(x, codes, codebooks, scales, bias, 0, gather, 0, entries)
            assert rel_err(out, ref) < TOLERANCE[dtype], (gather, entries)
    assert rel_err(cuda_kernels.matmul_1x16(x, codes, codebooks, scales, bias), ref) < TOLERANCE[dtype]
    assert (
        rel_err(
            cuda_kernels.matmul_1x16(x, codes, codebooks, scales, bias), reference(x, codes, codebooks, scales, bias)
        )
        < TOLERANCE[dtype]
    )
    assert torch.equal(codes, codes_before)


@requires_cuda
@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_decode_1x16_windows_splits_and_persistent_ctas(tokens: int) -> None:
    """Several x windows per split, several splits per row block, CTAs that loop over several tiles; deterministic."""
    from aqlm_ctx.kernels import cuda_kernels

    codes, codebooks, scales = make_layer("1x16", 8192, 8192, torch.float16, "cuda", seed=2)
    bias = torch.randn(8192, device="cuda", dtype=torch.float16)
    x = torch.randn(tokens, 8192, device="cuda", dtype=torch.float16)
    ref = decode_reference(x, codes, codebooks, scales, bias)
    cases = [(0, 8, 1), (0, 4, 8), (1, 8, 5), (2, 16, 8), (3, 16, 8), (3, 8, 1)]
    for gather, warps, splits in (c for c in cases if c[0] in gathers_1x16()):
        outs = [cuda_kernels.launch_1x16(x, codes, codebooks, scales, bias, splits, gather, warps) for _ in range(10)]
        assert rel_err(outs[0], ref) < TOLERANCE[torch.float16], (gather, warps, splits)
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), (gather, warps, splits)


@requires_cuda
def test_cuda_decode_1x16_declines_what_it_does_not_cover() -> None:
    from aqlm_ctx.kernels import cuda_kernels

    codes, codebooks, scales = make_layer("1x16", 32, 128, torch.float16, "cuda")
    low, high = cuda_kernels.DECODE_1X16_TOKEN_RANGE
    x = torch.randn(low, 128, device="cuda", dtype=torch.float16)
    assert cuda_kernels.supports_1x16(x, codes, codebooks, scales, None)
    assert not cuda_kernels.supports_1x16(x.float(), codes, codebooks, scales, None)
    assert not cuda_kernels.supports_1x16(x, codes, codebooks.bfloat16(), scales, None)
    for tokens in (low - 1, high + 1):  # no tokens; more than 32 go to Triton / dequantize
        outside = torch.randn(tokens, 128, device="cuda", dtype=torch.float16)
        assert not cuda_kernels.supports_1x16(outside, codes, codebooks, scales, None)
    odd_codes, odd_codebooks, odd_scales = make_layer("1x16", 32, 8 * 12, torch.float16, "cuda")  # 24-byte code rows
    assert not cuda_kernels.supports_1x16(x[:, :96], odd_codes, odd_codebooks, odd_scales, None)
    codes8, codebooks8, scales8 = make_layer("2x8", 32, 128, torch.float16, "cuda")
    assert not cuda_kernels.supports_1x16(x, codes8, codebooks8, scales8, None)


@requires_cuda
def test_cuda_decode_1x16_one_token_only_on_large_layers() -> None:
    """At 1 token the 1x16 kernel takes the large layers (sm_90+); the rest go to aqlm's matvec."""
    from aqlm_ctx.kernels import cuda_kernels
    from aqlm_ctx.kernels.dispatch import aqlm_matmul

    clusters = torch.cuda.get_device_capability() >= (9, 0)
    codes, codebooks, scales = make_layer("1x16", 8192, 8 * 2048, torch.float16, "cuda", seed=4)
    assert codes.shape[0] * codes.shape[1] == cuda_kernels.CLUSTER_1X16_MIN_GROUPS
    x = torch.randn(1, 8 * 2048, device="cuda", dtype=torch.float16)
    assert cuda_kernels.supports_1x16(x, codes, codebooks, scales, None) == clusters
    assert not cuda_kernels.supports_1x16(x, codes[:-16], codebooks, scales[:-16], None)  # just too few codes
    assert cuda_kernels.supports_1x16(torch.cat([x, x]), codes, codebooks, scales, None)
    small_codes, small_codebooks, small_scales = make_layer("1x16", 96, 256, torch.float16, "cuda", seed=5)
    bias = torch.randn(96, device="cuda", dtype=torch.float16)
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    assert not cuda_kernels.supports_1x16(x, small_codes, small_codebooks, small_scales, bias)
    with torch.no_grad():
        ours = aqlm_matmul(x, small_codes, small_codebooks, small_scales, bias)
    stock = torch.ops.aqlm.code1x16_matmat(x, small_codes, small_codebooks, small_scales, bias)
    assert torch.equal(ours, stock)


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_stock_kernels_get_non_contiguous_and_misaligned_inputs_right(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aqlm's stock matvec kernels read each input row as 16-byte vectors from its data pointer; the dispatcher hands
    them a contiguous, aligned copy where the input is neither."""
    from aqlm_ctx.kernels.dispatch import aqlm_matmul

    monkeypatch.setenv("AQLM_CTX_GPU_KERNELS", "0")
    codes, codebooks, scales = make_layer(fmt, 96, 256, torch.float16, "cuda", seed=6)
    bias = torch.randn(96, device="cuda", dtype=torch.float16)
    wide = torch.randn(3, 520, device="cuda", dtype=torch.float16)
    transposed = torch.randn(256, 3, device="cuda", dtype=torch.float16).T
    for x in (wide[:1, 1:257], wide[:, :512:2], wide[:2, 8:264], transposed, transposed[:1]):
        assert not x.is_contiguous() or x.data_ptr() % 16
        with torch.no_grad():
            out = aqlm_matmul(x, codes, codebooks, scales, bias)
        assert rel_err(out, decode_reference(x, codes, codebooks, scales, bias)) < TOLERANCE[torch.float16], x.stride()


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dtypes_aqlms_cuda_kernels_do_not_take_run_in_plain_torch(fmt: str) -> None:
    """fp32 layers on the GPU, and fp16 inputs into fp32 codebooks (as under autocast): aqlm's CUDA kernels raise or
    misread those, so the dispatcher computes them in plain torch."""
    from aqlm_ctx.kernels.dispatch import aqlm_matmul

    codes, codebooks, scales = make_layer(fmt, 96, 256, torch.float32, "cuda", seed=7)
    bias = torch.randn(96, device="cuda")
    for tokens in (1, 3, 40):
        x = torch.randn(tokens, 256, device="cuda")
        with torch.no_grad():
            out = aqlm_matmul(x, codes, codebooks, scales, bias)
            half = aqlm_matmul(x.half(), codes, codebooks, scales, bias)
        assert out.dtype == torch.float32 and rel_err(out, reference(x, codes, codebooks, scales, bias)) < 1e-5
        assert half.dtype == torch.float16
        assert rel_err(half, reference(x.half(), codes, codebooks, scales, bias)) < TOLERANCE[torch.float16]


# ---------------------------------------------------------------- CUDA prefill (wgmma) and dequantize-then-cuBLAS

requires_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the prefill kernel needs a Hopper GPU (compute capability 9.0)",
)


def test_cuda_prefill_plan() -> None:
    from aqlm_ctx.kernels.cuda_kernels import PREFILL_TILES, plan_prefill

    for tokens in (33, 64, 65, 129, 512, 4096):
        for out_f, groups in ((4096, 512), (8192, 3584), (28672, 1024), (300, 80)):
            tile, splits, per_split, whole = plan_prefill(tokens, out_f, groups, 132)
            tiles = -(-out_f // 128) * -(-tokens // tile)
            assert tile in PREFILL_TILES and (tile == PREFILL_TILES[0] or tile < 2 * tokens)
            assert splits == -(-groups // 8 // per_split) and (splits - 1) * per_split < groups // 8
            # With one split every tile is whole; else every tile is split, or those past the last whole wave.
            wave = 264 if tile == 64 else 132
            assert whole == tiles if splits == 1 else whole in (0, tiles // wave * wave) and whole < tiles
    assert plan_prefill(513, 300, 80, 132, token_tile=64, splits=3) == (64, 3, 4, 0)
    assert plan_prefill(513, 300, 80, 132, token_tile=64, splits=3, whole_tiles=20) == (64, 3, 4, 20)
    assert plan_prefill(513, 300, 80, 132, token_tile=64, splits=1, whole_tiles=0) == (64, 1, 10, 27)
    with pytest.raises(ValueError, match="whole_tiles=28: the plan has 27 tiles of 64 tokens"):
        plan_prefill(513, 300, 80, 132, token_tile=64, splits=3, whole_tiles=28)
    # Measured best on an H100: no split once the row x token tiles fill the SMs, split-K for fewer tokens.
    assert plan_prefill(512, 8192, 3584, 132) == (256, 1, 448, 128)
    assert plan_prefill(512, 4096, 512, 132) == (128, 1, 64, 128)
    assert plan_prefill(128, 4096, 512, 132) == (128, 4, 16, 0)
    # 448 tiles: three whole waves of 132 CTAs, then the last 52 tiles in two splits each (104 CTAs, one wave).
    assert plan_prefill(512, 28672, 1024, 132) == (256, 2, 64, 396)


@requires_hopper
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens", [33, 65, 129, 513])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_prefill_matches_reference(fmt: str, dtype_name: str, tokens: int, with_bias: bool) -> None:
    from aqlm_ctx.kernels import cuda_kernels

    dtype = DTYPES[dtype_name]
    out_features, in_features = 300, 8 * 80  # a partial row block, 10 stages
    codes, codebooks, scales = make_layer(fmt, out_features, in_features, dtype, "cuda", seed=tokens)
    codes_before = codes.clone()
    bias = torch.randn(out_features, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    expected = cuda_kernels.prefill_preferred(codebooks.shape[0], tokens, out_features, in_features)
    assert cuda_kernels.supports_prefill(x, codes, codebooks, scales, bias) == expected
    ref = decode_reference(x, codes, codebooks, scales, bias)
    # (token tile, splits, whole tiles): the planner's, forced, and only the tiles after the first whole ones split.
    for tile, splits, whole in (
        (0, 0, None),
        (0, 1, None),
        (0, 3, 0),
        (64, 1, None),
        (256, 4, 0),
        (64, 3, 1),
        (128, 2, 2),
    ):
        out = cuda_kernels.launch_prefill(x, codes, codebooks, scales, bias, tile, splits, whole)
        assert out.shape == (tokens, out_features) and out.dtype == dtype
        assert rel_err(out, ref) < TOLERANCE[dtype], (tile, splits, whole)
    assert rel_err(cuda_kernels.prefill_matmul(x, codes, codebooks, scales, bias), ref) < TOLERANCE[dtype]
    assert torch.equal(codes, codes_before)


@requires_hopper
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
def test_cuda_prefill_large_layer_is_deterministic(fmt: str) -> None:
    from aqlm_ctx.kernels import cuda_kernels

    codes, codebooks, scales = make_layer(fmt, 1024, 8192, torch.float16, "cuda", seed=4)
    bias = torch.randn(1024, device="cuda", dtype=torch.float16)
    x = torch.randn(300, 8192, device="cuda", dtype=torch.float16)
    ref = decode_reference(x, codes, codebooks, scales, bias)
    split = {}
    for splits, whole in ((1, None), (5, 0), (5, 16)):  # 8 row blocks x 3 token blocks of 128: 24 tiles
        outs = [cuda_kernels.launch_prefill(x, codes, codebooks, scales, bias, 128, splits, whole) for _ in range(5)]
        assert rel_err(outs[0], ref) < TOLERANCE[torch.float16]
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        split[whole] = outs[0]
    # Tiles 16-23 (tokens 256-299) are split either way: the same sums, whether or not the tiles before them are.
    assert torch.equal(split[0][256:], split[16][256:])


@requires_hopper
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
def test_cuda_prefill_3d_and_non_contiguous_inputs(fmt: str) -> None:
    from aqlm_ctx.kernels import cuda_kernels

    codes, codebooks, scales = make_layer(fmt, 96, 256, torch.bfloat16, "cuda", seed=5)
    bias = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    x3 = torch.randn(3, 45, 256, device="cuda", dtype=torch.bfloat16)
    out = cuda_kernels.prefill_matmul(x3, codes, codebooks, scales, bias)
    ref = decode_reference(x3.reshape(-1, 256), codes, codebooks, scales, bias).view(3, 45, 96)
    assert out.shape == (3, 45, 96) and rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    wide = torch.randn(40, 520, device="cuda", dtype=torch.bfloat16)  # 40 tokens: prefill for any layer size
    for x in (wide[:, :512:2], wide[:, 1:257], torch.randn(256, 40, device="cuda", dtype=torch.bfloat16).T):
        assert not x.is_contiguous()
        assert cuda_kernels.supports_prefill(x, codes, codebooks, scales, bias)
        out = cuda_kernels.prefill_matmul(x, codes, codebooks, scales, bias)
        assert rel_err(out, decode_reference(x, codes, codebooks, scales, bias)) < TOLERANCE[torch.bfloat16]
    assert cuda_kernels.prefill_matmul(x3[:0], codes, codebooks, scales, bias).shape == (0, 45, 96)


@requires_cuda
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_cuda_dequantized_matches_reference(fmt: str, dtype_name: str) -> None:
    from aqlm_ctx.kernels import cuda_kernels
    from aqlm_ctx.kernels.reference import dequantize_weight

    dtype = DTYPES[dtype_name]
    codes, codebooks, scales = make_layer(fmt, 200, 8 * 40, dtype, "cuda", seed=6)
    weight = cuda_kernels.dequantize(codes, codebooks, scales)
    ref_weight = dequantize_weight(codes, codebooks.double(), scales.double())
    assert weight.shape == (200, 320) and weight.dtype == dtype and rel_err(weight, ref_weight) < TOLERANCE[dtype]
    bias = torch.randn(200, device="cuda").to(dtype)
    x = torch.randn(2, 65, 320, device="cuda").to(dtype)
    out = cuda_kernels.dequantized_matmul(x, codes, codebooks, scales, bias)
    ref = decode_reference(x.reshape(-1, 320), codes, codebooks, scales, bias).view(2, 65, 200)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    low, high = cuda_kernels.DEQUANTIZED_TOKEN_RANGES[(codebooks.shape[0], codebooks.shape[1])]
    assert cuda_kernels.supports_dequantized(x, codes, codebooks, scales, bias) == (low <= 130 <= high)


@requires_hopper
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
def test_cuda_prefill_graph_compile_and_dispatch(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA-graph capture and torch.compile(fullgraph) of both prefill routes; dispatch through QuantizedLinear."""
    aqlm = pytest.importorskip("aqlm")
    from aqlm_ctx.kernels import cuda_kernels
    from aqlm_ctx.kernels.dispatch import install_kernels

    codes, codebooks, scales = make_layer(fmt, 512, 1024, torch.float16, "cuda", seed=14)
    bias = torch.randn(512, device="cuda", dtype=torch.float16)
    static_x = torch.randn(100, 1024, device="cuda", dtype=torch.float16)
    routes = (cuda_kernels.prefill_matmul, cuda_kernels.dequantized_matmul)
    for route in routes:
        route(static_x, codes, codebooks, scales, bias)  # build and counters outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_ys = [route(static_x, codes, codebooks, scales, bias) for route in routes]
    for _ in range(2):
        static_x.copy_(torch.randn(100, 1024, device="cuda", dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        for y in static_ys:
            assert rel_err(y, decode_reference(static_x, codes, codebooks, scales, bias)) < 4e-3

    for route in routes:
        compiled = torch.compile(lambda x, f=route: torch.relu(f(x, codes, codebooks, scales, bias)), fullgraph=True)
        x = torch.randn(70, 1024, device="cuda", dtype=torch.float16)
        assert rel_err(compiled(x), torch.relu(decode_reference(x, codes, codebooks, scales, bias))) < 4e-3

    layer = aqlm.QuantizedLinear(1024, 512, 8, 1, codebooks.shape[0], 8, bias=True, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer.codes.copy_(codes)
        layer.codebooks.copy_(codebooks)
        layer.scales.copy_(scales)
        layer.bias.copy_(bias)
    install_kernels(layer)
    calls: list[int] = []
    real = cuda_kernels.prefill_matmul
    monkeypatch.setattr(cuda_kernels, "prefill_matmul", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 20, 1024, device="cuda", dtype=torch.float16)  # 40 tokens: the prefill kernel's range
    with torch.no_grad():
        out = layer(x)
    ref = decode_reference(x.reshape(-1, 1024), codes, codebooks, scales, bias).view(2, 20, 512)
    assert calls and rel_err(out, ref) < 4e-3
    monkeypatch.setenv("AQLM_CTX_GPU_KERNELS", "0")
    with torch.no_grad():
        stock = layer(x)
    assert len(calls) == 1 and rel_err(stock, ref) < 4e-3

"""aqlm_ctx's race-free CPU kernels agree with an independent plain-torch dequantization at default threads."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from aqlm_ctx.kernels import cpu

pytest.importorskip("numba")


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The dense weight, written independently of the library: a loop over codebooks with plain indexing."""
    num_codebooks, codebook_size, out_group, in_group = codebooks.shape
    out_groups, in_groups, _ = codes.shape
    idx = codes.long() % codebook_size
    groups = torch.zeros(out_groups, in_groups, out_group, in_group, dtype=torch.float64)
    for c in range(num_codebooks):
        groups += codebooks[c].double()[idx[:, :, c]]
    groups = groups * scales.double()
    return groups.permute(0, 2, 1, 3).reshape(out_groups * out_group, in_groups * in_group)


Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def expected(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in float64 with the independently dequantized ``W``."""
    y = x.double() @ dequantize(codes, codebooks, scales).T
    return y if bias is None else y + bias.double()


def make_layer(
    out_features: int,
    in_features: int,
    num_codebooks: int,
    nbits: int,
    in_group: int,
    bias: bool = True,
    seed: int = 0,
) -> Layer:
    """Random codes (full signed range), codebooks, scales and bias for a layer with out_group_size 1."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.int8 if nbits <= 8 else torch.int16
    info = torch.iinfo(dtype)
    codes = torch.randint(info.min, info.max + 1, (out_features, in_features // in_group, num_codebooks),
                          generator=gen, dtype=torch.int64).to(dtype)  # fmt: skip
    codebooks = torch.randn(num_codebooks, 2**nbits, 1, in_group, generator=gen)
    scales = torch.rand(out_features, 1, 1, 1, generator=gen) + 0.5
    b = torch.randn(out_features, generator=gen) if bias else None
    return codes, codebooks, scales, b


def assert_close(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-3) -> None:
    """Max absolute error within ``tol`` times the largest reference output."""
    scale = ref.abs().max().item() + 1e-6
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= tol * scale, f"max error {err} vs output scale {scale}"


@pytest.mark.parametrize("num_codebooks", [1, 2, 4])
@pytest.mark.parametrize("in_group", [8, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 7, 33])
def test_matches_reference_8bit(num_codebooks: int, in_group: int, bias: bool, tokens: int) -> None:
    codes, codebooks, scales, b = make_layer(72, 96, num_codebooks, 8, in_group, bias, seed=tokens)
    codes_before = codes.clone()
    x = torch.randn(tokens, 96)
    assert cpu.supports(x, codes, codebooks)
    y = cpu.matmul(x, codes, codebooks, scales, b)
    assert y.shape == (tokens, 72) and y.dtype == torch.float32
    assert_close(y, expected(x, codes, codebooks, scales, b))
    assert torch.equal(codes, codes_before)


@pytest.mark.parametrize("tokens", [1, 3, 7, 32, 33])
@pytest.mark.parametrize("nbits", [16, 12, 4])
def test_matches_reference_other_sizes(tokens: int, nbits: int) -> None:
    codes, codebooks, scales, b = make_layer(40, 64, 1, nbits, 8, seed=nbits)
    codes_before = codes.clone()
    x = torch.randn(tokens, 64)
    assert cpu.supports(x, codes, codebooks)
    assert_close(cpu.matmul(x, codes, codebooks, scales, b), expected(x, codes, codebooks, scales, b))
    assert torch.equal(codes, codes_before)


@pytest.mark.parametrize("tokens", [1, 5, 17, 40])
def test_every_path_on_a_tiny_layer(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force each path (lookup tables in token chunks, row tiles, dequantized row blocks) on sizes that are not
    multiples of the parts, chunks, tiles and blocks."""
    codes, codebooks, scales, b = make_layer(19, 24, 3, 8, 4, seed=3)
    x = torch.randn(tokens, 24)
    ref = expected(x, codes, codebooks, scales, b)
    monkeypatch.setattr(cpu, "LUT_TOKEN_CHUNK", 3)
    monkeypatch.setattr(cpu, "DEQUANTIZE_BLOCK_BYTES", 4 * 24 * 5)  # 5 rows per block: 19 = 5 + 5 + 5 + 4
    for lut_max in (0, 1000):
        monkeypatch.setattr(cpu, "LUT_MAX_TOKENS", lut_max)
        assert_close(cpu.matmul(x, codes, codebooks, scales, b), ref)
    codes10, codebooks10, scales10, b10 = make_layer(19, 24, 2, 10, 4, seed=4)
    ref10 = expected(x, codes10, codebooks10, scales10, b10)
    monkeypatch.setattr(cpu, "TILE_ROWS", 8)  # 19 = 8 + 8 + 3
    for tile_max in (0, 1000):
        monkeypatch.setattr(cpu, "TILE_MAX_TOKENS", tile_max)
        assert_close(cpu.matmul(x, codes10, codebooks10, scales10, b10), ref10)


@pytest.mark.parametrize("num_codebooks", [1, 2, 3, 4])
def test_codes_at_odd_storage_offsets_and_strides(num_codebooks: int) -> None:
    """Codes that live at an odd byte offset of a bigger buffer (as in a memory-mapped checkpoint) or are
    non-contiguous give the same results as contiguous ones."""
    codes, codebooks, scales, b = make_layer(48, 64, num_codebooks, 8, 8, seed=num_codebooks)
    buffer = torch.zeros(1 + codes.numel(), dtype=torch.int8)
    buffer[1:] = codes.reshape(-1)
    shifted = buffer[1:].view(codes.shape)
    strided = codes.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    x = torch.randn(3, 64)
    ref = expected(x, codes, codebooks, scales, b)
    for layout in (shifted, strided):
        for tokens in (x[:1], x):
            assert_close(cpu.matmul(tokens, layout, codebooks, scales, b), ref[: len(tokens)])


@pytest.mark.parametrize(("num_codebooks", "nbits"), [(1, 16), (2, 8), (1, 12), (3, 4)])
def test_dequantize_path_is_bit_exact_with_the_reference(num_codebooks: int, nbits: int) -> None:
    """Multiplying by the identity (more tokens than the kernels' limits) returns the dense weight: exactly the
    weight that ``reference.dequantize_weight`` builds."""
    from aqlm_ctx.kernels.reference import dequantize_weight

    codes, codebooks, scales, _ = make_layer(40, 64, num_codebooks, nbits, 8, seed=nbits)
    y = cpu.matmul(torch.eye(64), codes, codebooks, scales, None)
    assert torch.equal(y.T, dequantize_weight(codes, codebooks, scales))


def test_codes_changed_in_place_are_seen_by_the_next_call() -> None:
    """The input-major copy of the codes is a cache: writing into the codes (load_state_dict, copy_) invalidates it."""
    codes, codebooks, scales, b = make_layer(64, 128, 2, 8, 8, seed=5)
    x = torch.randn(2, 128)
    for tokens in (x[:1], x):
        assert_close(cpu.matmul(tokens, codes, codebooks, scales, b), expected(tokens, codes, codebooks, scales, b))
    new_codes, _, _, _ = make_layer(64, 128, 2, 8, 8, seed=6)
    codes.copy_(new_codes)
    for tokens in (x[:1], x):
        assert_close(cpu.matmul(tokens, codes, codebooks, scales, b), expected(tokens, codes, codebooks, scales, b))
    codes.data = make_layer(64, 128, 2, 8, 8, seed=7)[0]
    assert_close(cpu.matmul(x, codes, codebooks, scales, b), expected(x, codes, codebooks, scales, b))


def test_inference_codes_changed_in_place_inside_inference_mode_are_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Codes made under inference_mode have no version counter: an in-place write there is still seen (each call
    makes its copy again, and the first such call says so once)."""
    monkeypatch.setattr(cpu, "_warned_inference", False)
    with torch.inference_mode(), pytest.warns(UserWarning, match="codes are inference tensors .* every call"):
        codes, codebooks, scales, b = make_layer(64, 128, 2, 8, 8, seed=5)
        x = torch.randn(2, 128)
        assert codes.is_inference()
        for tokens in (x[:1], x):
            assert_close(cpu.matmul(tokens, codes, codebooks, scales, b), expected(tokens, codes, codebooks, scales, b))
        codes.copy_(make_layer(64, 128, 2, 8, 8, seed=6)[0])
        for tokens in (x[:1], x):
            assert_close(cpu.matmul(tokens, codes, codebooks, scales, b), expected(tokens, codes, codebooks, scales, b))
    assert codes not in cpu._INPUT_MAJOR_CODES


def test_codes_given_new_storage_at_the_old_address_are_seen() -> None:
    """``codes.data = ...`` keeps the version counter; the storage the cached copy was made from is held with it, so
    new storage can never take its address and pass for the old codes."""
    codes, codebooks, scales, b = make_layer(64, 128, 2, 8, 8, seed=11)
    x = torch.randn(2, 128)
    for seed in range(12, 22):
        cpu.matmul(x, codes, codebooks, scales, b)
        first = make_layer(64, 128, 2, 8, 8, seed=seed)[0]
        codes.data = first
        del first  # the storage before it is free now (unless the cache holds it): the next one may take its place
        codes.data = torch.empty_like(codes).copy_(make_layer(64, 128, 2, 8, 8, seed=seed + 100)[0])
        assert_close(cpu.matmul(x, codes, codebooks, scales, b), expected(x, codes, codebooks, scales, b))


def test_no_input_features_give_the_bias() -> None:
    from aqlm_ctx.kernels.dispatch import aqlm_matmul

    codes, codebooks, scales = (
        torch.zeros(16, 0, 2, dtype=torch.int8),
        torch.randn(2, 256, 1, 8),
        torch.ones(16, 1, 1, 1),
    )
    bias = torch.randn(16)
    for tokens in (1, 3, 40):
        out = aqlm_matmul(torch.randn(tokens, 0), codes, codebooks, scales, bias)
        assert torch.equal(out, bias.expand(tokens, 16))


def test_input_major_copies_of_codes_that_changed_are_dropped() -> None:
    """The cache keeps no copy for codes that were replaced (e.g. a model moved to the GPU keeps its Parameters)."""
    first = make_layer(16, 32, 2, 8, 8, seed=9)
    second = make_layer(16, 32, 2, 8, 8, seed=10)
    x = torch.randn(1, 32)
    cpu.matmul(x, *first)
    assert first[0] in cpu._INPUT_MAJOR_CODES
    first[0].data = first[0].data.clone()  # new storage, as Module.to() does
    cpu.matmul(x, *second)
    assert first[0] not in cpu._INPUT_MAJOR_CODES and second[0] in cpu._INPUT_MAJOR_CODES


@pytest.mark.parametrize("in_features", [64, 8])  # 8: one input group, where a permuted copy could alias the codes
def test_nbits_below_8_reads_codes_modulo_the_codebook_size(in_features: int) -> None:
    """Codes store unsigned values; bits above nbits are ignored, as aqlm's reference does (``codes % 2**nbits``),
    and the stored codes keep those bits."""
    codes, codebooks, scales, b = make_layer(32, in_features, 2, 4, 8, seed=8)
    noisy = (codes.long() + 16 * torch.randint(0, 8, codes.shape)).to(torch.int8)
    noisy_before = noisy.clone()
    x = torch.randn(3, in_features)
    for tokens in (x[:1], x):
        assert_close(cpu.matmul(tokens, noisy, codebooks, scales, b), expected(tokens, codes, codebooks, scales, b))
    assert torch.equal(noisy, noisy_before)


def test_thread_pool_start_leaves_the_environment_alone() -> None:
    codes, codebooks, scales, b = make_layer(16, 32, 2, 8, 8)
    before = dict(os.environ)
    cpu.matmul(torch.randn(1, 32), codes, codebooks, scales, b)
    assert dict(os.environ) == before


def test_3d_and_non_contiguous_input() -> None:
    codes, codebooks, scales, b = make_layer(64, 128, 2, 8, 8)
    x3 = torch.randn(2, 5, 128)
    y3 = cpu.matmul(x3, codes, codebooks, scales, b)
    assert y3.shape == (2, 5, 64)
    assert_close(y3.reshape(10, 64), expected(x3.reshape(10, 128), codes, codebooks, scales, b))
    xt = torch.randn(128, 3).T  # non-contiguous [3, 128]
    assert not xt.is_contiguous()
    assert_close(cpu.matmul(xt, codes, codebooks, scales, b), expected(xt, codes, codebooks, scales, b))
    xs = torch.randn(3, 256)[:, ::2]
    assert_close(cpu.matmul(xs, codes, codebooks, scales, None), expected(xs, codes, codebooks, scales, None))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32_and_cast_back(dtype: torch.dtype) -> None:
    codes, codebooks, scales, b = make_layer(32, 64, 2, 8, 8)
    x = torch.randn(3, 64).to(dtype)
    cb, sc, bb = codebooks.to(dtype), scales.to(dtype), b.to(dtype)
    assert cpu.supports(x, codes, cb)
    y = cpu.matmul(x, codes, cb, sc, bb)
    assert y.dtype == dtype
    ref = expected(x.float(), codes, cb.float(), sc.float(), bb.float())
    assert (y.double() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


def test_unsupported_layouts() -> None:
    codes, codebooks, _, _ = make_layer(32, 64, 2, 8, 8)
    x = torch.randn(1, 64)
    assert not cpu.supports(x, codes, codebooks.reshape(2, 256, 2, 4))  # out_group_size 2
    assert not cpu.supports(x, codes.int(), codebooks)  # int32 codes
    assert not cpu.supports(torch.randn(1, 63), codes, codebooks)  # wrong in_features
    assert not cpu.supports(x, codes, torch.randn(2, 200, 1, 8))  # not a power of two
    assert not cpu.supports(x, codes, torch.randn(2, 512, 1, 8))  # int8 codes cannot index 512 entries


def test_grad_tensors_do_not_break_numpy_views() -> None:
    codes, codebooks, scales, b = make_layer(16, 32, 2, 8, 8)
    codebooks.requires_grad_(True)
    x = torch.randn(2, 32, requires_grad=True)
    with torch.no_grad():
        y = cpu.matmul(x, codes, codebooks, scales, b)
    assert_close(y, expected(x.detach(), codes, codebooks.detach(), scales, b))


@pytest.fixture(scope="module")
def big_layer() -> Layer:
    return make_layer(4096, 4096, 2, 8, 8, bias=True, seed=7)


def test_repeated_calls_at_default_threads_are_exact(big_layer: Layer) -> None:
    """aqlm's numba kernel returns wrong values on 15-40% of calls with 2 threads; ours: 0 wrong in 1000."""
    codes, codebooks, scales, b = big_layer
    codes_before = codes.clone()
    x = torch.randn(1, 4096)
    x4 = torch.randn(4, 4096)
    ref = expected(x, codes, codebooks, scales, b).float()
    ref4 = expected(x4, codes, codebooks, scales, b).float()
    tol = 1e-3 * ref.abs().max().item()
    bad = 0
    for i in range(1000):
        if i % 10 == 9:
            bad += int((cpu.matmul(x4, codes, codebooks, scales, b) - ref4).abs().max().item() > tol)
        else:
            bad += int((cpu.matmul(x, codes, codebooks, scales, b) - ref).abs().max().item() > tol)
    assert bad == 0
    assert torch.equal(codes, codes_before)


@pytest.mark.parametrize(("num_codebooks", "nbits", "tokens"), [(2, 8, 1), (2, 8, 5), (1, 16, 1), (1, 16, 6)])
def test_results_do_not_depend_on_the_thread_count(num_codebooks: int, nbits: int, tokens: int) -> None:
    """Bit for bit the same output with one numba thread and with the default number."""
    import numba

    codes, codebooks, scales, b = make_layer(1000, 1024, num_codebooks, nbits, 8, seed=12)
    x = torch.randn(tokens, 1024)
    default = numba.get_num_threads()
    y = cpu.matmul(x, codes, codebooks, scales, b)
    numba.set_num_threads(1)
    try:
        y1 = cpu.matmul(x, codes, codebooks, scales, b)
    finally:
        numba.set_num_threads(default)
    assert torch.equal(y, y1)
    assert_close(y, expected(x, codes, codebooks, scales, b))


def test_concurrent_calls_from_four_threads(big_layer: Layer) -> None:
    codes, codebooks, scales, b = big_layer
    inputs = [torch.randn(n, 4096) for n in (1, 2, 1, 5)]
    refs = [expected(x, codes, codebooks, scales, b).float() for x in inputs]
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def worker(k: int) -> None:
        barrier.wait()
        for _ in range(8):
            y = cpu.matmul(inputs[k], codes, codebooks, scales, b)
            err = (y - refs[k]).abs().max().item()
            if err > 1e-3 * refs[k].abs().max().item():
                errors.append(f"thread {k}: error {err}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_installed_quantized_linear_end_to_end() -> None:
    aqlm = pytest.importorskip("aqlm")
    from aqlm_ctx.kernels import install_kernels

    layer = aqlm.QuantizedLinear(4096, 4096, 8, 1, 2, 8, bias=True)
    codes, codebooks, scales, b = make_layer(4096, 4096, 2, 8, 8, bias=True, seed=11)
    with torch.no_grad():
        layer.codes.copy_(codes)
        layer.codebooks.copy_(codebooks)
        layer.scales.copy_(scales)
        layer.bias.copy_(b)
    install_kernels(layer)
    for tokens in (1, 3):
        x = torch.randn(1, tokens, 4096)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (1, tokens, 4096)
        assert_close(y[0], expected(x[0], codes, codebooks, scales, b))
    assert tuple(layer.codes.shape) == (4096, 512, 2)
    assert torch.equal(layer.codes, codes)


def _two_by_eight(bias: bool = True) -> torch.nn.Module:
    from aqlm_ctx import AqlmConfig, aqlm_quantized, load_tensors
    from aqlm_ctx.testing import random_tensors

    with aqlm_quantized(AqlmConfig(num_codebooks=2, nbits_per_codebook=8)):
        layer = torch.nn.Linear(64, 32, bias=bias)
    return load_tensors(layer, random_tensors(layer))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32(dtype: torch.dtype) -> None:
    layer = _two_by_eight()
    for tokens in (1, 4, 64):
        x = torch.randn(tokens, 64)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            out = layer(x)
        assert out.dtype == torch.float32
        assert_close(out, expected(x, layer.codes, layer.codebooks, layer.scales, layer.bias))


def test_loaded_and_run_under_inference_mode() -> None:
    with torch.inference_mode():
        layer = _two_by_eight()
        x = torch.randn(1, 64)
        out = layer(x)
    assert_close(out, expected(x, layer.codes, layer.codebooks, layer.scales, layer.bias))
    with torch.no_grad():  # codes made under inference_mode (the tensors were the caller's) work outside it too
        assert_close(layer(x), out)


def test_torch_compile_runs_the_cpu_kernels_eagerly() -> None:
    layer = _two_by_eight()
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_close(compiled(x), expected(x, layer.codes, layer.codebooks, layer.scales, layer.bias))


def test_plain_torch_fallback_casts_the_bias_to_the_input_dtype() -> None:
    from aqlm_ctx.kernels.dispatch import aqlm_matmul

    codes = torch.randint(-128, 128, (8, 8, 2), dtype=torch.int8)  # out_group_size 2: no numba kernel
    codebooks, scales, bias = torch.randn(2, 256, 2, 8), torch.rand(8, 1, 1, 1) + 0.5, torch.randn(16)
    x = torch.randn(3, 64, dtype=torch.float16)
    out = aqlm_matmul(x, codes, codebooks, scales, bias)
    assert out.dtype == torch.float16
    reference = x.double() @ dequantize(codes, codebooks, scales).T + bias.double()
    assert torch.allclose(out.double(), reference, rtol=2e-2, atol=2e-2)


def test_forward_mode_and_torch_func_transforms_go_through_plain_torch() -> None:
    from torch.autograd import forward_ad

    layer = _two_by_eight()
    weight = dequantize(layer.codes, layer.codebooks, layer.scales).float()
    x, tangent = torch.randn(3, 64), torch.randn(3, 64)
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent))).tangent
    assert out is not None and torch.allclose(out, tangent @ weight.T, atol=1e-5)
    batched = torch.func.vmap(layer)(torch.randn(4, 3, 64))
    assert batched.shape == (4, 3, 32)
    grad = torch.func.grad(lambda v: layer(v).sum())(torch.randn(64))
    assert torch.allclose(grad, weight.sum(0), atol=1e-5)


def test_float64_layers_are_exact() -> None:
    layer = _two_by_eight().double()
    x = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float64
    assert torch.allclose(out, expected(x, layer.codes, layer.codebooks, layer.scales, layer.bias), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (x,))


def test_jit_trace_and_export_record_the_plain_torch_path() -> None:
    """The numba kernel writes into an output buffer the tracer cannot see (a trace replayed an empty buffer), and
    export takes no graph break: both record plain torch, which gives the same values."""
    import warnings

    layer = _two_by_eight().eval()
    x, other = torch.randn(2, 64), torch.randn(3, 64)
    with torch.no_grad():
        expected_other = expected(other, layer.codes, layer.codebooks, layer.scales, layer.bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
            traced = torch.jit.trace(layer, x)
        assert_close(traced(other), expected_other)
        exported = torch.export.export(layer, (x,))  # static shapes: called with the traced token count
        assert_close(exported.module()(other[:2]), expected_other[:2])

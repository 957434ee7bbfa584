"""Tests of aqlm_ctx.encoding: layout, determinism, quality against round-to-nearest, and input checks."""

from __future__ import annotations

from pathlib import Path

import aqlm
import pytest
import torch
from torch import nn

from aqlm_ctx import quantize_weights_, replace_linear_layers, save_checkpoint, summarize
from aqlm_ctx.cli import inspect_checkpoint
from aqlm_ctx.config import AqlmConfig
from aqlm_ctx.encoding import EncodedLinear, encode_linear, quantized_bits_per_weight
from aqlm_ctx.kernels import install_kernels

CONFIGS = {
    "1x16 g8": AqlmConfig(num_codebooks=1, nbits_per_codebook=16, in_group_size=8),
    "2x8 g8": AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=8),
    "1x8 g8": AqlmConfig(num_codebooks=1, nbits_per_codebook=8, in_group_size=8),
    "2x8 g4": AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=4),
    "2x6 g8x2": AqlmConfig(num_codebooks=2, nbits_per_codebook=6, in_group_size=8, out_group_size=2),
    "1x4 g4": AqlmConfig(num_codebooks=1, nbits_per_codebook=4, in_group_size=4),
}


def plain_dequantize(enc: EncodedLinear, nbits: int) -> torch.Tensor:
    """``W[o*og+a, i*ig+b] = scales[o] * sum_c codebooks[c, codes[o,i,c] mod 2**nbits, a, b]``, written out."""
    codes = enc.codes.long() % 2**nbits
    num_codebooks, _, og, ig = enc.codebooks.shape
    out_groups, in_groups, _ = codes.shape
    weight = torch.zeros(out_groups * og, in_groups * ig, dtype=torch.float64)
    for o in range(out_groups):
        for i in range(in_groups):
            block = sum(enc.codebooks[c, codes[o, i, c]].double() for c in range(num_codebooks))
            weight[o * og : (o + 1) * og, i * ig : (i + 1) * ig] = enc.scales[o, 0, 0, 0].double() * block
    return weight


def rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest with per-group min-max scales (1 bit: sign times mean absolute value)."""
    rows = weight.reshape(-1, group)
    if bits == 1:
        return (torch.sign(rows) * rows.abs().mean(1, keepdim=True)).reshape(weight.shape)
    low, high = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    step = (high - low).clamp_min(1e-12) / (2**bits - 1)
    return (((rows - low) / step).round() * step + low).reshape(weight.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layout_dtypes_and_reconstruction(name: str) -> None:
    cfg = CONFIGS[name]
    out_features, in_features = 32, 64
    weight = torch.randn(out_features, in_features)
    enc = encode_linear(weight, cfg, rounds=1)
    og, ig, C, nbits = cfg.out_group_size, cfg.in_group_size, cfg.num_codebooks, cfg.nbits_per_codebook
    assert enc.codes.shape == (out_features // og, in_features // ig, C)
    assert enc.codes.dtype == (torch.int8 if nbits <= 8 else torch.int16)
    assert enc.codebooks.shape == (C, 2**nbits, og, ig)
    assert enc.scales.shape == (out_features // og, 1, 1, 1)
    assert enc.codebooks.dtype == enc.scales.dtype == torch.float32
    stored = enc.codes.long()
    assert int(stored.min()) >= -(2 ** (nbits - 1)) and int(stored.max()) < 2 ** (nbits - 1)
    reference = plain_dequantize(enc, nbits)
    torch.testing.assert_close(enc.dequantize().double(), reference, rtol=1e-5, atol=1e-6)
    assert rel(reference.float(), weight) < 0.9


@pytest.mark.parametrize("name", ["2x8 g8", "1x16 g8", "2x8 g4"])
def test_quantized_linear_computes_the_encoded_weight(name: str) -> None:
    cfg = CONFIGS[name]
    weight, bias = torch.randn(24, 32), torch.randn(24)
    enc = encode_linear(weight, cfg, rounds=1)
    layer = aqlm.QuantizedLinear(
        32, 24, cfg.in_group_size, cfg.out_group_size, cfg.num_codebooks, cfg.nbits_per_codebook
    )
    layer.codes.data, layer.codebooks.data, layer.scales.data = enc
    layer.bias.data = bias
    install_kernels(layer)
    x = torch.randn(5, 32)
    expected = x.double() @ plain_dequantize(enc, cfg.nbits_per_codebook).T + bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert layer.codes.dtype == enc.codes.dtype


def test_config_forms_and_dtype() -> None:
    weight = torch.randn(16, 32, dtype=torch.float64)
    data = {"quant_method": "aqlm", "num_codebooks": 2, "nbits_per_codebook": 4, "in_group_size": 8}
    enc = encode_linear(weight, data, rounds=1)
    assert enc.codebooks.dtype == enc.scales.dtype == torch.float64
    half = encode_linear(weight, AqlmConfig(num_codebooks=2, nbits_per_codebook=4, dtype="float16"), rounds=1)
    assert half.codebooks.dtype == half.scales.dtype == torch.float16
    assert half.codes.dtype == torch.int8
    codes, codebooks, scales = enc
    assert codes is enc.codes and codebooks is enc.codebooks and scales is enc.scales


def test_deterministic_for_a_generator() -> None:
    weight = torch.randn(64, 64)
    cfg = CONFIGS["2x8 g8"]
    first = encode_linear(weight, cfg, generator=torch.Generator().manual_seed(1), rounds=1)
    second = encode_linear(weight, cfg, generator=torch.Generator().manual_seed(1), rounds=1)
    other = encode_linear(weight, cfg, generator=torch.Generator().manual_seed(2), rounds=1)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.codebooks, other.codebooks)
    default = encode_linear(weight, cfg, rounds=1)
    assert torch.equal(default.codes, encode_linear(weight, cfg, rounds=1).codes)


@pytest.mark.parametrize(
    ("name", "bits", "group"), [("2x8 g8", 2, 64), ("1x8 g8", 1, 64), ("2x8 g4", 4, 64), ("1x16 g8", 2, 64)]
)
def test_lower_error_than_rtn_at_the_same_bits(name: str, bits: int, group: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(128, 256) * torch.rand(128, 1)  # rows of different magnitudes
    enc = encode_linear(weight, CONFIGS[name])
    assert CONFIGS[name].bits_per_weight == bits
    assert rel(enc.dequantize(), weight) < rel(rtn(weight, bits, group), weight)


def test_more_rounds_do_not_hurt() -> None:
    weight = torch.randn(64, 128)
    errors = [rel(encode_linear(weight, CONFIGS["2x8 g8"], rounds=r).dequantize(), weight) for r in (0, 2)]
    assert errors[1] <= errors[0] + 1e-6


def test_exact_when_codebook_has_room_for_every_group() -> None:
    weight = torch.randn(48, 64)  # 384 groups, 65536 entries
    enc = encode_linear(weight, CONFIGS["1x16 g8"])
    assert rel(enc.dequantize(), weight) < 1e-5
    assert quantized_bits_per_weight(CONFIGS["1x16 g8"], 64, 48) > 300  # the codebook dominates


def test_input_stats_lower_the_output_error() -> None:
    torch.manual_seed(0)
    in_features, out_features = 128, 64
    mixing = torch.randn(in_features, in_features) / 8 + torch.eye(in_features)
    scale = torch.logspace(-1, 0.5, in_features)
    inputs = (torch.randn(1024, in_features) @ mixing) * scale
    held_out = (torch.randn(1024, in_features) @ mixing) * scale
    weight = torch.randn(out_features, in_features)
    stats = inputs.T @ inputs
    for name in ("2x8 g8", "1x8 g8"):
        plain = encode_linear(weight, CONFIGS[name]).dequantize()
        aware = encode_linear(weight, CONFIGS[name], input_stats=stats).dequantize()
        for x in (inputs, held_out):
            assert rel(aware @ x.T, weight @ x.T) < 0.8 * rel(plain @ x.T, weight @ x.T)


def correlated_inputs(in_features: int, samples: int, seed: int) -> torch.Tensor:
    """Samples of one fixed distribution of correlated, unevenly scaled inputs (``seed`` picks the samples)."""
    fixed = torch.Generator().manual_seed(0)
    mixing = torch.randn(in_features, in_features, generator=fixed) / in_features**0.5 + 0.5 * torch.eye(in_features)
    samples_generator = torch.Generator().manual_seed(seed)
    return (torch.randn(samples, in_features, generator=samples_generator) @ mixing) * torch.linspace(
        0.2, 3, in_features
    )


def output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    return rel(approx @ inputs.T, weight @ inputs.T)


def test_sweeps_against_the_full_input_stats_lower_the_output_error() -> None:
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    inputs, held_out = correlated_inputs(128, 2048, seed=2), correlated_inputs(128, 2048, seed=3)
    stats = inputs.T @ inputs
    for name in ("2x8 g4", "1x8 g8"):
        errors = [
            output_error(weight, encode_linear(weight, CONFIGS[name], input_stats=stats, sweeps=s).dequantize(), x)
            for s in (0, 1, 3)
            for x in (inputs, held_out)
        ]
        assert errors[2] < 0.97 * errors[0] and errors[4] < errors[2], (name, errors)  # calibration inputs
        assert errors[3] < 0.97 * errors[1] and errors[5] < errors[3], (name, errors)  # held-out inputs
    first, again = (encode_linear(weight, CONFIGS["2x8 g4"], input_stats=stats, rounds=1) for _ in range(2))
    assert torch.equal(first.codes, again.codes) and torch.equal(first.codebooks, again.codebooks)  # deterministic


def test_a_sweep_never_raises_the_output_error() -> None:
    from aqlm_ctx.encoding import _damped, _reconstruct, _sweep_codes

    generator = torch.Generator().manual_seed(4)
    groups = torch.randn(32, 16, 4, generator=generator)  # 32 rows of 16 input groups of 4
    codebooks = torch.randn(2, 16, 4, generator=generator) * 0.7
    codes = torch.randint(0, 16, (32 * 16, 2), generator=generator)
    scales = torch.rand(32, generator=generator) + 0.5
    inputs = correlated_inputs(64, 512, seed=5)
    hess, _ = _damped((inputs.T @ inputs).double())

    def error(chosen: torch.Tensor) -> float:
        approx = _reconstruct(chosen, codebooks).view(32, 16, 4) * scales[:, None, None]
        delta = (groups - approx).reshape(32, 64).double()
        return float(((delta @ hess) * delta).sum())

    before = error(codes)
    swept = _sweep_codes(groups, codes, codebooks, scales, hess, beam_size=4)
    after = error(swept)
    assert after < 0.9 * before
    assert error(_sweep_codes(groups, swept, codebooks, scales, hess, beam_size=4)) <= after * (1 + 1e-9)


def test_bits_per_weight() -> None:
    assert quantized_bits_per_weight(CONFIGS["2x8 g8"], 4096, 4096) == pytest.approx(
        2 + (2 * 256 * 8 * 16 + 4096 * 16) / 4096**2
    )
    assert quantized_bits_per_weight({"num_codebooks": 1, "nbits_per_codebook": 16}, 4096, 4096) == (
        pytest.approx(2 + (65536 * 8 * 16 + 4096 * 16) / 4096**2)
    )
    with pytest.raises(ValueError, match="in_group_size 8"):
        quantized_bits_per_weight(CONFIGS["2x8 g8"], 12, 16)


@pytest.mark.parametrize(
    ("weight", "kwargs", "error", "match"),
    [
        (torch.randn(16, 12), {}, ValueError, r"in_features 12 .*\[16, 12\].*in_group_size 8"),
        (torch.randn(15, 16), {"config": CONFIGS["2x6 g8x2"]}, ValueError, r"out_features 15.*out_group_size 2"),
        (torch.randn(16), {}, ValueError, "2-D"),
        (torch.randn(2, 16, 16), {}, ValueError, "2-D"),
        (torch.randint(0, 5, (16, 16)), {}, TypeError, "floating"),
        ([[1.0] * 8] * 8, {}, TypeError, "torch.Tensor"),
        (torch.full((16, 16), float("nan")), {}, ValueError, "NaN"),
        (torch.randn(16, 16), {"input_stats": torch.eye(8)}, ValueError, r"input_stats.*\[16, 16\].*\[8, 8\]"),
        (torch.randn(16, 16), {"input_stats": torch.eye(16, dtype=torch.int64)}, TypeError, "input_stats"),
        (torch.randn(16, 16), {"rounds": -1}, ValueError, "rounds"),
        (torch.randn(16, 16), {"beam_size": 0}, ValueError, "beam_size"),
        (torch.randn(16, 16), {"sweeps": -1}, ValueError, "sweeps"),
        (torch.randn(16, 16), {"generator": 3}, TypeError, "generator"),
        (torch.randn(16, 16), {"config": 3}, TypeError, "AqlmConfig"),
    ],
)
def test_bad_inputs(weight: object, kwargs: dict, error: type[Exception], match: str) -> None:
    config = kwargs.pop("config", CONFIGS["2x8 g8"])
    with pytest.raises(error, match=match):
        encode_linear(weight, config, **kwargs)  # type: ignore[arg-type]


def test_large_codebook_inverted_file_path() -> None:
    """Codebooks above 4096 entries are built in cells and searched by cell; more groups than entries here."""
    torch.manual_seed(0)
    weight = torch.randn(256, 512)  # 16384 groups of 8, 8192 entries
    cfg = AqlmConfig(num_codebooks=1, nbits_per_codebook=13, in_group_size=8)
    enc = encode_linear(weight, cfg, rounds=1)
    assert enc.codes.dtype == torch.int16 and enc.codebooks.shape == (1, 8192, 1, 8)
    assert int((enc.codes.long() % 8192).unique().numel()) > 4096
    error = rel(enc.dequantize(), weight)
    assert error < rel(encode_linear(weight, CONFIGS["1x8 g8"], rounds=1).dequantize(), weight)
    assert error < rel(rtn(weight, 2, 64), weight)


@pytest.mark.parametrize("name", ["1x4 g4", "2x6 g8x2", "2x8 g8"])
def test_bits_per_weight_counts_codes_at_their_storage_width(name: str, tmp_path: Path) -> None:
    """``quantized_bits_per_weight``, ``summarize`` and ``aqlm-ctx inspect`` agree: a 1x4 code is an int8 (8 bits)."""
    cfg = CONFIGS[name]
    og, ig = cfg.out_group_size, cfg.in_group_size
    codes = (64 // og) * (64 // ig) * cfg.num_codebooks * 8  # int8 codes, whatever nbits_per_codebook is
    codebooks = cfg.num_codebooks * cfg.codebook_size * og * ig * 16
    expected = (codes + codebooks + (64 // og) * 16) / (64 * 64)
    assert quantized_bits_per_weight(cfg, 64, 64) == pytest.approx(expected)
    model = nn.Sequential(nn.Linear(64, 64).half())
    quantize_weights_(model, cfg, progress=False, rounds=0, kmeans_iters=1)
    assert model[0].codes.dtype == torch.int8
    assert summarize(model).bits_per_weight == pytest.approx(expected)
    save_checkpoint(model, tmp_path)
    assert inspect_checkpoint(tmp_path)["bits_per_weight"] == pytest.approx(expected)


def test_layers_that_share_codes_count_once_in_the_summary() -> None:
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    model[1].weight = model[0].weight
    replace_linear_layers(model, AqlmConfig(num_codebooks=2, nbits_per_codebook=8))
    assert model[0].codes is model[1].codes
    summary = summarize(model)
    assert summary.quantized_layers == 2 and summary.quantized_weights == summary.parameters == 256
    assert summary.dense_bytes == 256 * 2

"""quantize_weights_: encode a real model in place, save it, and get the same model back from the checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from aqlm import QuantizedLinear
from torch import nn

import aqlm_ctx
from aqlm_ctx import AqlmConfig, quantize_weights_, quantizing, save_checkpoint, substitutions
from aqlm_ctx.encoding import encode_linear
from aqlm_ctx.substitutions import FusedExperts

from .hub import dequantize
from .utils import tiny_llama_config

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_encodes_in_place_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    dense_weight = q_proj.weight.detach().clone()
    with torch.no_grad():
        reference = model(IDS).logits
    assert quantize_weights_(model, CONFIG, skip=["lm_head"], progress=False) is model
    assert type(q_proj) is QuantizedLinear and q_proj is model.model.layers[0].self_attn.q_proj
    assert type(model.lm_head) is nn.Linear
    encoded = dequantize(q_proj.codes, q_proj.codebooks, q_proj.scales).float()
    assert (encoded - dense_weight).norm() / dense_weight.norm() < 0.5  # 2 bits per weight: coarse but informed
    with torch.no_grad():
        quantized = model(IDS).logits
    assert torch.isfinite(quantized).all()
    assert ((quantized - reference).norm() / reference.norm()) < 0.5
    save_checkpoint(model, tmp_path)
    again = aqlm_ctx.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, quantized)


def test_calibration_lowers_output_error() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator) * torch.logspace(0, -2, 64)  # strongly correlated inputs
    inputs = torch.randn(256, 64, generator=generator) @ mixing
    errors = {}
    for calibrated in (False, True):
        torch.manual_seed(1)
        layer = nn.Sequential(nn.Linear(64, 512))  # 4096 groups for 256 codebook entries: lossy
        with torch.no_grad():
            reference = layer(inputs)
        quantize_weights_(layer, CONFIG, calibration=[inputs] if calibrated else None, progress=False)
        with torch.no_grad():
            errors[calibrated] = ((layer(inputs) - reference).norm() / reference.norm()).item()
    assert errors[True] < errors[False]


def test_refuses_meta_and_indivisible_layers_without_changing_the_model() -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="0: its weight is on the meta device"):
        quantize_weights_(meta, CONFIG, progress=False)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(12, 16))
    with pytest.raises(ValueError, match=r"(?s)1: Linear\(12, 16\).*add them to skip=\[\.\.\.\].*not changed"):
        quantize_weights_(model, CONFIG, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize_weights_("model", CONFIG)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encodes_on_the_gpu_with_calibration_as_well_as_on_the_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator) / 8 + torch.eye(64)
    inputs = torch.randn(512, 64, generator=generator) @ mixing
    errors = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        layer = nn.Sequential(nn.Linear(64, 256)).to(device)
        x = inputs.to(device)
        with torch.no_grad():
            reference = layer(x)
        quantize_weights_(
            layer, AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=4), calibration=[x], progress=False
        )
        quantized = layer[0]
        assert type(quantized) is QuantizedLinear
        assert {t.device.type for t in (quantized.codes, quantized.codebooks, quantized.scales)} == {device}
        with torch.no_grad():
            errors[device] = ((layer(x) - reference).norm() / reference.norm()).item()
    assert errors["cuda"] < 1.1 * errors["cpu"], errors


def test_non_finite_weight_is_refused_before_any_layer_is_converted() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"(?s)\n  2: its weight of shape \[16, 16\] has NaN.*not changed"):
        quantize_weights_(model, CONFIG, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


@pytest.mark.parametrize("batch", [0, 1])
def test_non_finite_calibration_inputs_name_the_layer_they_reached(batch: int) -> None:
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)))
    batches = [torch.randn(4, 16), torch.randn(4, 16)]
    batches[batch][1, 3] = float("inf")
    with pytest.raises(
        ValueError, match=rf"calibration batch {batch}: layer '1.0'.*NaN or infinite.*not changed"
    ) as info:
        quantize_weights_(model, CONFIG, calibration=batches, progress=False)
    assert "input_stats" not in str(info.value)
    assert [type(m) for m in model[1]] == [nn.Linear, nn.Linear]


def test_an_error_while_encoding_a_later_layer_leaves_the_model_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    calls = []

    def failing(weight: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(weight)
        if len(calls) == 2:
            raise ValueError("boom")
        return encode_linear(weight, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(quantizing, "encode_linear", failing)
    with pytest.raises(ValueError, match="^1: boom; the model was not changed"):
        quantize_weights_(model, CONFIG, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_bad_encoding_options_are_refused_before_calibration() -> None:
    model = nn.Sequential(nn.Linear(16, 16))

    def never() -> Iterator[torch.Tensor]:
        pytest.fail("calibration ran")
        yield torch.zeros(1, 16)

    with pytest.raises(ValueError, match="rounds must be an int >= 0"):
        quantize_weights_(model, CONFIG, calibration=never(), progress=False, rounds=-1)
    with pytest.raises(TypeError, match="unknown encoding option.*beam.*allowed: rounds, beam_size"):
        quantize_weights_(model, CONFIG, calibration=never(), progress=False, beam=2)
    assert type(model[0]) is nn.Linear


def test_calibration_inputs_of_the_wrong_width_name_the_layer() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(
        ValueError, match=r"calibration batch 0: layer '0' got an input of shape \[4, 12\].*in_features is 16"
    ):
        quantize_weights_(model, CONFIG, calibration=[torch.randn(4, 12)], progress=False)
    assert type(model[0]) is nn.Linear


class KeywordCall(nn.Module):
    """Calls its Linear by keyword, as ``nn.Linear.forward(input=...)`` allows."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 128)
        self.keyword = keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(input=x) if self.keyword else self.lin(x)


def test_calibration_reads_inputs_passed_by_keyword() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    codes = []
    for keyword in (True, False):
        model = KeywordCall(keyword)
        quantize_weights_(model, CONFIG, calibration=[inputs], progress=False, rounds=1, sweeps=1)
        codes.append(model.lin.codes)
    assert torch.equal(codes[0], codes[1])
    assert not torch.equal(codes[0], quantize_weights_(KeywordCall(True), CONFIG, progress=False, rounds=1).lin.codes)


def test_calibration_runs_in_eval_mode_and_restores_every_training_flag() -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Linear(128, 64))

    inputs = [torch.randn(32, 64) + 3, torch.randn(32, 64)]
    model = build()  # training mode, but one submodule in eval
    model[2].eval()
    running = (model[2].running_mean.clone(), model[2].running_var.clone())
    quantize_weights_(model, CONFIG, calibration=inputs, progress=False, rounds=1, sweeps=1)
    assert torch.equal(model[2].running_mean, running[0]) and torch.equal(model[2].running_var, running[1])
    assert int(model[2].num_batches_tracked) == 0
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    model[2].train()
    reference = build().eval()  # the same statistics as an eval-mode model: dropout was off
    quantize_weights_(reference, CONFIG, calibration=inputs, progress=False, rounds=1, sweeps=1)
    assert all(torch.equal(model[i].codes, reference[i].codes) for i in (1, 3))


def test_warns_about_layers_no_calibration_batch_reached() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Partial()
    with pytest.warns(UserWarning, match="no calibration batch reached these layers.*: unused$") as record:
        quantize_weights_(model, CONFIG, calibration=[torch.randn(4, 16)], progress=False, rounds=0)
    assert record[0].filename == __file__  # the caller's line
    assert type(model.unused) is QuantizedLinear


def tiny_mixtral() -> transformers.MixtralForCausalLM:
    """Every layer has at most 256 groups: each group becomes a codebook entry, so encoding is exact."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    return transformers.MixtralForCausalLM(config).eval()


def test_fused_moe_experts_are_encoded_per_expert_from_their_weights(tmp_path: Path) -> None:
    model = tiny_mixtral()
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    with torch.no_grad():
        reference = model(IDS).logits
    quantize_weights_(model, CONFIG, skip=["lm_head", "experts.1.w2"], progress=False, rounds=0, kmeans_iters=1)
    fused = model.model.layers[0].mlp.experts
    assert type(fused) is FusedExperts and not any("gate_up_proj" in name for name, _ in model.named_parameters())
    for index in range(2):
        gate, up = gate_up[index].chunk(2)
        for name, weight in (("w1", gate), ("w3", up), ("w2", down[index])):
            layer = fused[index][name]
            if index == 1 and name == "w2":
                assert type(layer) is nn.Linear and torch.equal(layer.weight, weight)  # skipped: the original
            else:
                assert type(layer) is QuantizedLinear
                torch.testing.assert_close(dequantize(layer.codes, layer.codebooks, layer.scales).float(), weight)
    with torch.no_grad():
        quantized = model(IDS).logits
    torch.testing.assert_close(quantized, reference)
    save_checkpoint(model, tmp_path)
    again = aqlm_ctx.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():  # not bit for bit: BLAS may take another path for the dense expert's loaded weight
        torch.testing.assert_close(again(IDS).logits, quantized, rtol=0, atol=1e-6)


def test_an_interrupt_while_encoding_experts_swaps_the_fused_experts_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_mixtral()
    experts = model.model.layers[0].mlp.experts
    state = {key: value.clone() for key, value in model.state_dict().items()}
    calls = []

    def interrupted(weight: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(weight)
        if len(calls) == 6:  # inside the experts
            raise KeyboardInterrupt
        return encode_linear(weight, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(quantizing, "encode_linear", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_weights_(model, CONFIG, progress=False, rounds=0, kmeans_iters=1)
    assert model.model.layers[0].mlp.experts is experts
    assert not any(isinstance(m, (QuantizedLinear, FusedExperts)) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


class Fused(nn.Module):
    """A module with a fused weight, substituted by a Linear layer without a fill."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))


def test_a_substituted_module_with_weights_but_no_fill_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    substitution = substitutions.Substitution(Fused, lambda _: nn.ModuleDict({"a": nn.Linear(16, 16)}))
    monkeypatch.setitem(substitutions._REGISTRY, Fused, substitution)
    fused = Fused()
    model = nn.Sequential(fused, nn.Linear(16, 16))
    with pytest.raises(ValueError, match="no fill to give their layers the original weights.*: Fused at 0$"):
        quantize_weights_(model, CONFIG, progress=False)
    assert model[0] is fused and type(model[1]) is nn.Linear


def test_a_bias_tied_to_another_module_stays_tied_and_saves(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.BertForMaskedLM(config).eval()
    predictions = model.cls.predictions
    with torch.no_grad():
        predictions.bias.normal_()
    assert predictions.decoder.bias is predictions.bias
    quantize_weights_(model, CONFIG, progress=False, rounds=0, kmeans_iters=1)
    assert type(predictions.decoder) is QuantizedLinear and predictions.decoder.bias is predictions.bias
    with torch.no_grad():
        quantized = model(IDS).logits
    save_checkpoint(model, tmp_path)  # safetensors refuses tensors that share memory under two names
    with aqlm_ctx.aqlm_quantized(CONFIG):
        again = transformers.BertForMaskedLM(config).eval()
    aqlm_ctx.load_checkpoint(again, tmp_path, device="cpu")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, quantized)


def tied_pair() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False))
    model[2].weight = model[0].weight
    return model


def test_layers_sharing_a_weight_share_one_encoding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tied_pair()
    inputs = torch.randn(32, 64)
    with torch.no_grad():
        hidden = model[1](model[0](inputs)).double()
    stats = []

    def recording(weight: torch.Tensor, *args: object, **kwargs: object) -> object:
        stats.append(kwargs["input_stats"])
        return encode_linear(weight, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(quantizing, "encode_linear", recording)
    quantize_weights_(model, CONFIG, calibration=[inputs], progress=False, rounds=1, kmeans_iters=2, sweeps=1)
    assert len(stats) == 1  # encoded once, against the output error of both layers
    torch.testing.assert_close(stats[0], inputs.double().T @ inputs.double() + hidden.T @ hidden)
    assert all(getattr(model[0], name) is getattr(model[2], name) for name in ("codes", "codebooks", "scales"))
    assert aqlm_ctx.summarize(model).quantized_weights == 64 * 64
    with torch.no_grad():
        quantized = model(inputs)
    save_checkpoint(model, tmp_path)
    again = aqlm_ctx.from_pretrained(tmp_path, tied_pair, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(inputs), quantized)


def test_under_inference_mode_the_new_tensors_are_ordinary_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 32))
    with torch.inference_mode():
        inputs = torch.randn(16, 32)
        quantize_weights_(model, CONFIG, calibration=[inputs], progress=False, rounds=0, kmeans_iters=1, sweeps=1)
        assert torch.is_inference_mode_enabled()
    assert [m.training for m in model.modules()] == [True, True, True, True]
    for layer in (model[0], model[2]):
        assert type(layer) is QuantizedLinear
        assert not any(parameter.is_inference() for parameter in layer.parameters())
    model[0].codebooks.requires_grad_(True)
    model.eval()(torch.randn(2, 32)).sum().backward()
    assert model[0].codebooks.grad is not None
    with torch.no_grad():
        model[2].scales.mul_(2.0)


@pytest.mark.parametrize(("dtype", "factor"), [(torch.float32, 1e20), (torch.float64, 1e200)])
def test_a_weight_too_large_for_the_encoder_names_the_layer(dtype: torch.dtype, factor: float) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(dtype)
    with torch.no_grad():
        model[1].weight.mul_(factor)  # finite, but its squares overflow float32
    with pytest.raises(ValueError, match=r"(?s)\n  1: its weight of shape \[64, 64\] has values up to .* out of range"):
        quantize_weights_(model, CONFIG, progress=False, rounds=0, kmeans_iters=1)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]

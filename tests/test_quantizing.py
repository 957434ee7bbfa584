"""quantize_weights_: encode a real model in place, save it, and get the same model back from the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from aqlm import QuantizedLinear
from torch import nn

import aqlm_ctx
from aqlm_ctx import AqlmConfig, quantize_weights_, save_checkpoint

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
    with pytest.raises(ValueError, match=r"(?s)1: Linear\(12, 16\).*not changed"):
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

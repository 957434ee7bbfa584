"""peft LoRA on models built by aqlm_ctx: peft's AQLM LoRA layer wraps our QuantizedLinear layers and trains.

The model is built under ``aqlm_quantized``, loaded with random AQLM tensors, and LoRA is injected after the block:
adapters are ordinary ``nn.Linear`` on the CPU, peft dispatches its AQLM layer on the exact ``aqlm.QuantizedLinear``
class, and a backward pass reaches the adapters only.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from aqlm import QuantizedLinear
from torch import nn

import aqlm_ctx
from aqlm_ctx import AqlmConfig, aqlm_quantized
from aqlm_ctx.testing import random_tensors

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
TARGETS = ("q_proj", "v_proj")


class Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        return self.o_proj(scores.softmax(-1) @ self.v_proj(x))


class TinyModel(nn.Module):
    def __init__(self, vocab: int = 32, hidden: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Attention(hidden) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(x)


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def build(kind: str) -> nn.Module:
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = tiny_llama() if kind == "llama" else TinyModel()
    aqlm_ctx.load_tensors(model, random_tensors(model))
    return model


def run(model: nn.Module, kind: str, ids: torch.Tensor) -> torch.Tensor:
    if kind == "llama":
        return model(input_ids=ids).logits
    return model(ids)


def test_peft_has_an_aqlm_lora_layer() -> None:
    module = importlib.import_module("peft.tuners.lora.aqlm")
    assert hasattr(module, "AqlmLoraLinear") and hasattr(module, "dispatch_aqlm")


def inject(kind: str) -> tuple[nn.Module, dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    """Build, load, run once, inject LoRA; return the peft model, the targets, the input and the base output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build(kind)
    targets = {path: module for path, module in model.named_modules() if path.rsplit(".", 1)[-1] in TARGETS}
    assert targets and all(type(module) is QuantizedLinear for module in targets.values())
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        base_output = run(model, kind, ids)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS))), targets, ids, base_output


@pytest.mark.parametrize("kind", ["llama", "custom"])
def test_lora_wraps_our_quantized_layers(kind: str) -> None:
    from peft.tuners.lora.aqlm import AqlmLoraLinear

    peft_model, targets, ids, base_output = inject(kind)
    wrapped = {
        path.removeprefix("base_model.model."): module
        for path, module in peft_model.named_modules()
        if isinstance(module, AqlmLoraLinear)
    }
    assert wrapped.keys() == targets.keys()
    for path, lora in wrapped.items():
        assert lora.base_layer is targets[path]  # peft wrapped our very layer, not a copy
        for adapter in (lora.lora_A["default"], lora.lora_B["default"]):
            assert type(adapter) is nn.Linear  # built after the block: ordinary layers ...
            assert adapter.weight.device.type == "cpu" and adapter.weight.requires_grad  # ... on a real device
    assert not any(p.device.type == "meta" for p in peft_model.parameters())
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in peft_model.named_parameters() if ".lora_" in name}
    assert len(trainable) == 2 * len(targets)
    # lora_B starts at zero: the adapted model computes exactly what the quantized model did.
    with torch.no_grad():
        torch.testing.assert_close(run(peft_model, kind, ids), base_output)


def test_in_place_add_on_a_quantized_output_with_grad() -> None:
    """The quantized output may be modified in place while autograd records (peft's LoRA adds into it)."""
    with aqlm_quantized(CONFIG):
        model = nn.Sequential(nn.Linear(16, 16))
    aqlm_ctx.load_tensors(model, random_tensors(model))
    x = torch.randn(2, 16, requires_grad=True)
    y = model(x)
    y += 1
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kind", ["llama", "custom"])
def test_lora_backward_trains_only_the_adapters(kind: str) -> None:
    peft_model, _, ids, base_output = inject(kind)
    lora_names = {name for name, _ in peft_model.named_parameters() if ".lora_" in name}
    output = run(peft_model, kind, ids)
    torch.testing.assert_close(output, base_output)
    output.float().pow(2).mean().backward()
    with_grad = {name for name, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == lora_names
    assert all(p.grad.abs().sum() > 0 for name, p in peft_model.named_parameters() if "lora_B" in name)
    assert all(p.grad is None for name, p in peft_model.named_parameters() if ".lora_" not in name)

    # One optimiser step moves the adapters and nothing else; the output changes through them.
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= lora_names
    with torch.no_grad():
        assert not torch.equal(run(peft_model, kind, ids), base_output)


def test_lora_backward_reaches_the_adapters_when_inputs_need_no_grad() -> None:
    """With LoRA on the first layer only, no quantized layer sees an input that needs grad."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build("custom")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["layers.0.q_proj"]))
    ids = torch.randint(0, 32, (2, 5))
    run(peft_model, "custom", ids).pow(2).mean().backward()
    with_grad = {name for name, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in peft_model.named_parameters() if ".lora_" in name}
    assert len(with_grad) == 2


def test_saving_a_model_with_adapters_is_refused(tmp_path: Path) -> None:
    peft_model, _, _, _ = inject("llama")
    with pytest.raises(ValueError, match=r"wraps a quantized layer in an adapter \(peft\).*unload\(\)"):
        aqlm_ctx.save_checkpoint(peft_model.base_model.model, tmp_path)
    assert not any(tmp_path.iterdir())

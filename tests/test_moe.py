"""AQLM Mixtral (per-expert codes) and Qwen2-MoE on transformers 5's fused experts, through substitutions."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from aqlm import QuantizedLinear
from safetensors.torch import save_file
from torch import nn

from aqlm_ctx import AqlmConfig, aqlm_quantized, from_pretrained, load_tensors, quantize_model, replace_linear_layers
from aqlm_ctx.substitutions import FusedExperts
from aqlm_ctx.testing import random_tensors

from .hub import dequantize, encode_random
from .utils import signature

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
TOKENS = torch.tensor([[5, 9, 33, 2, 71, 14, 8]])


def tiny_mixtral() -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )


def tiny_qwen2_moe() -> transformers.Qwen2MoeConfig:
    return transformers.Qwen2MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
    )


def test_mixtral_experts_come_out_per_expert_and_quantized() -> None:
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = transformers.MixtralForCausalLM(tiny_mixtral())
    block = model.model.layers[0].mlp
    assert type(block.experts) is FusedExperts and len(block.experts) == 4
    assert all(type(expert[name]) is QuantizedLinear for expert in block.experts for name in ("w1", "w2", "w3"))
    assert block.experts[0]["w1"].in_features == 64 and block.experts[0]["w2"].out_features == 64
    assert not any("gate_up_proj" in name for name, _ in model.named_parameters())
    assert type(block.gate).__name__ == "MixtralTopKRouter"  # the router stays dense
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * (4 + 4 * 3)


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_qwen2_moe])
def test_context_decorator_visitor_agree_on_moe(make: object) -> None:
    config = make()  # type: ignore[operator]
    model_class = (
        transformers.MixtralForCausalLM if "Mixtral" in type(config).__name__ else transformers.Qwen2MoeForCausalLM
    )
    with aqlm_quantized(CONFIG, skip=["lm_head", "experts.1"]):
        by_context = model_class(config)
    by_decorator = quantize_model(CONFIG, skip=["lm_head", "experts.1"])(model_class)(config)
    with torch.device("meta"):
        by_visitor = model_class(config)
    replace_linear_layers(by_visitor, CONFIG, skip=["lm_head", "experts.1"])
    assert signature(by_decorator) == signature(by_context) == signature(by_visitor)
    assert type(by_context.model.layers[0].mlp.experts[1][by_context.model.layers[0].mlp.experts.names[0]]) is nn.Linear


@pytest.mark.parametrize("skip", [["model.layers.0.mlp"], ["*.experts.*.w2"]])
def test_visitor_on_real_weights_keeps_them_in_skipped_experts(skip: list[str]) -> None:
    """Skipped layers of a converted fused-experts block hold the original's weights (a whole block computes the
    same); the quantized ones hold nothing."""
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(tiny_mixtral()).eval()
    original = model.model.layers[0].mlp.experts
    gate_up, down = original.gate_up_proj.detach().clone(), original.down_proj.detach().clone()
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        before = model.model.layers[0].mlp(hidden)
    replace_linear_layers(model, CONFIG, skip=["lm_head", *skip])
    experts = model.model.layers[0].mlp.experts
    for index, expert in enumerate(experts):
        assert torch.equal(expert["w2"].weight, down[index]) and not expert["w2"].weight.is_meta
        if skip == ["model.layers.0.mlp"]:
            assert torch.equal(torch.cat([expert["w1"].weight, expert["w3"].weight]), gate_up[index])
        else:
            assert type(expert["w1"]) is QuantizedLinear
    if skip == ["model.layers.0.mlp"]:
        with torch.no_grad():
            assert torch.equal(model.model.layers[0].mlp(hidden), before)


def test_fused_experts_take_the_experts_dtype() -> None:
    def build() -> nn.Module:
        return transformers.MixtralForCausalLM._from_config(tiny_mixtral(), dtype=torch.bfloat16)

    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        by_context = build()
    by_visitor = replace_linear_layers(build(), CONFIG, skip=["lm_head"])
    for model in (by_context, by_visitor):
        assert model.model.layers[0].mlp.experts[0]["w1"].codebooks.dtype == torch.bfloat16
    assert signature(by_context) == signature(by_visitor.to("meta"))


def write_mixtral_checkpoint(directory: Path, dense: transformers.MixtralForCausalLM) -> None:
    """The layout AQLM's converter writes: per-expert w1/w2/w3 codes under block_sparse_moe, dense router."""
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    skip: list[str] = []
    fmt = (2, 8, 8)
    for index, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{index}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(layer.self_attn, name)
            encoded = encode_random(linear.out_features, linear.in_features, fmt, generator, torch.float32)
            tensors.update({f"{prefix}.self_attn.{name}.{k}": v for k, v in encoded.items()})
            with torch.no_grad():
                linear.weight.copy_(dequantize(**encoded))
        experts = layer.mlp.experts
        hidden, intermediate = experts.hidden_dim, experts.intermediate_dim
        for e in range(experts.num_experts):
            weights = {}
            for name, (out_f, in_f) in {
                "w1": (intermediate, hidden),
                "w3": (intermediate, hidden),
                "w2": (hidden, intermediate),
            }.items():
                encoded = encode_random(out_f, in_f, fmt, generator, torch.float32)
                tensors.update({f"{prefix}.block_sparse_moe.experts.{e}.{name}.{k}": v for k, v in encoded.items()})
                weights[name] = dequantize(**encoded).float()
            with torch.no_grad():
                experts.gate_up_proj[e].copy_(torch.cat([weights["w1"], weights["w3"]]))
                experts.down_proj[e].copy_(weights["w2"])
        tensors[f"{prefix}.block_sparse_moe.gate.weight"] = layer.mlp.gate.weight.detach().clone()
        skip.append(f"{prefix}.block_sparse_moe.gate.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = getattr(layer, norm).weight.detach().clone()
            skip.append(f"{prefix}.{norm}.weight")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        tensors[name] = dense.get_parameter(name).detach().clone()
        skip.append(name)
    save_file(tensors, directory / "model.safetensors")
    config = dense.config.to_dict()
    config["architectures"] = ["MixtralForCausalLM"]
    config["quantization_config"] = {
        "quant_method": "aqlm",
        "in_group_size": 8,
        "out_group_size": 1,
        "num_codebooks": 2,
        "nbits_per_codebook": 8,
        "linear_weights_not_to_quantize": skip,
    }
    (directory / "config.json").write_text(json.dumps(config, default=str))


def test_hub_mixtral_checkpoint_matches_dense_fused_mixtral(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = transformers.MixtralForCausalLM(tiny_mixtral()).eval()
    write_mixtral_checkpoint(tmp_path, dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the renamed skip list matches modules: no warning
        model = from_pretrained(tmp_path, dtype=torch.float32)
    assert type(model.model.layers[1].mlp.experts) is FusedExperts
    torch.testing.assert_close(model.model.layers[1].mlp.gate.weight, dense.model.layers[1].mlp.gate.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, dense(TOKENS).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(
            model.generate(TOKENS, max_new_tokens=3, do_sample=False),
            dense.generate(TOKENS, max_new_tokens=3, do_sample=False),
        )
    from aqlm_ctx.cli import inspect_checkpoint

    report = inspect_checkpoint(tmp_path)  # the renamed skip list matches the architecture there too
    assert report["skip_checked_against"] == "architecture" and report["skip_unmatched"] == []


def test_qwen2_moe_matches_dense_fused_model() -> None:
    with aqlm_quantized(CONFIG):
        model = transformers.Qwen2MoeForCausalLM(tiny_qwen2_moe())
    load_tensors(model, random_tensors(model), dtype=torch.float32)
    dense = transformers.Qwen2MoeForCausalLM(tiny_qwen2_moe()).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = dequantize(module.codes, module.codebooks, module.scales).float()
    for name, tensor in model.state_dict().items():
        if not name.endswith(("codes", "codebooks", "scales")):
            state[name] = tensor
    for index, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{index}.mlp.experts"
        experts = layer.mlp.experts
        for e in range(experts.num_experts):
            gate, up, down = (state.pop(f"{prefix}.{e}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
            state[f"{prefix}.gate_up_proj"] = state.get(f"{prefix}.gate_up_proj", experts.gate_up_proj.detach().clone())
            state[f"{prefix}.gate_up_proj"][e] = torch.cat([gate, up])
            state[f"{prefix}.down_proj"] = state.get(f"{prefix}.down_proj", experts.down_proj.detach().clone())
            state[f"{prefix}.down_proj"][e] = down
    dense.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, dense(TOKENS).logits, rtol=1e-4, atol=1e-4)


MEMORY_PROBE = """
import resource, torch, transformers
from aqlm_ctx import AqlmConfig, aqlm_quantized
config = transformers.MixtralConfig()  # Mixtral-8x7B
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with aqlm_quantized(AqlmConfig(), skip=["lm_head"]):
    model = transformers.MixtralForCausalLM(config)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
quantized = sum(type(m).__name__ == "QuantizedLinear" for m in model.modules())
real = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta")
print(growth, quantized, real)
"""


def test_mixtral_8x7b_skeleton_allocates_no_weight_memory() -> None:
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True)
    growth, quantized, real = result.stdout.split()
    assert int(quantized) == 32 * (4 + 8 * 3)
    assert int(real) == 0
    assert float(growth) < 200  # MB: module objects only; the fused experts alone would be 45.6 B parameters

"""Context == decorator == visitor on real transformers architectures, and agreement with transformers' own path."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from aqlm_ctx import AqlmConfig, aqlm_quantized, quantize_model, replace_linear_layers

from .utils import linear_paths, quantized_paths, signature

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
}

ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 4, "pad_token_id": 0}),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 64, "intermediate_size": None},
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "bert": ("BertConfig", "BertModel", {}),
}


def tiny_config(name: str, tie: bool) -> Any:
    config_name, _, extra = ARCHITECTURES[name]
    fields = {key: value for key, value in {**SMALL, **extra}.items() if value is not None}
    if name == "opt":
        fields["num_hidden_layers"] = 2
    return getattr(transformers, config_name)(**fields, tie_word_embeddings=tie)


def build_plain(name: str, tie: bool) -> nn.Module:
    return getattr(transformers, ARCHITECTURES[name][1])(tiny_config(name, tie))


CASES = [(name, tie) for name in ARCHITECTURES for tie in (True, False) if not (name == "bert" and not tie)]


@pytest.mark.parametrize(("name", "tie"), CASES)
@pytest.mark.parametrize("skip", [["lm_head"], [], ["layers.1", "lm_head.weight"]])
def test_context_decorator_visitor_agree(name: str, tie: bool, skip: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # patterns that name no module in an architecture (bert has no lm_head)
        with aqlm_quantized(CONFIG, skip=skip):
            by_context = build_plain(name, tie)
        by_decorator = quantize_model(CONFIG, skip=skip)(build_plain)(name, tie)
        with torch.device("meta"):
            by_visitor = build_plain(name, tie)
        replace_linear_layers(by_visitor, CONFIG, skip=skip)
    reference = signature(by_context)
    assert signature(by_decorator) == reference
    assert signature(by_visitor) == reference
    assert quantized_paths(by_context), "nothing was quantized"
    if skip and name != "bert":
        assert "lm_head" not in quantized_paths(by_context)


def transformers_replace(model: nn.Module, skip: list[str]) -> None:
    import transformers.quantizers
    from transformers.integrations.aqlm import replace_with_aqlm_linear

    theirs = transformers.AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
    try:
        replace_with_aqlm_linear(model, modules_to_not_convert=skip, quantization_config=theirs)
    except TypeError:  # transformers 4.x signature
        replace_with_aqlm_linear(model, quantization_config=theirs, linear_weights_not_to_quantize=skip)


@pytest.mark.parametrize(("name", "tie"), CASES)
def test_same_quantized_paths_as_transformers(name: str, tie: bool) -> None:
    skip = ["lm_head"] if name != "bert" else ["pooler.dense"]
    with aqlm_quantized(CONFIG, skip=skip):
        ours = build_plain(name, tie)
    with torch.device("meta"):
        theirs = build_plain(name, tie)
    transformers_replace(theirs, skip)
    assert quantized_paths(ours) == quantized_paths(theirs)
    assert linear_paths(ours) == linear_paths(theirs)


def test_tied_lm_head_kept_dense_stays_tied_and_quantized_one_is_untied() -> None:
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        tied = build_plain("llama", tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with aqlm_quantized(CONFIG):
        untied = build_plain("llama", tie=True)
    assert "weight" not in dict(untied.lm_head.named_parameters())


def test_multihead_attention_model_builds_and_out_proj_is_untouched() -> None:
    with aqlm_quantized(CONFIG):
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, dim_feedforward=128), num_layers=2)
    layer = model.layers[0]
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert quantized_paths(model) == {f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")}

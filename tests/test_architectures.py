"""Breadth: a fast subset of the architecture sweep, BERT encoders, nn.MultiheadAttention models and GPT-2's Conv1D.

The full sweep over every ``*ForCausalLM`` class is ``benchmarks/architectures.py``; its functions are reused here.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
from aqlm import QuantizedLinear
from torch import nn

from aqlm_ctx import AqlmConfig, aqlm_quantized, load_tensors, quantize_model, replace_linear_layers
from aqlm_ctx.testing import random_tensors

from .utils import quantized_paths, signature


def _load_sweep() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "architectures.py"
    spec = importlib.util.spec_from_file_location("benchmarks_architectures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()
CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)

# Fast ones, chosen to cover: tied embeddings, GQA, sliding windows, MoE with fused experts, encoder-decoder style
# decoders, BERT-style tied decoder weight and bias, Mamba/hybrid layers and ALiBi.
FORWARD_SAMPLE = [
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "GPTNeoXForCausalLM",
    "OPTForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "BartForCausalLM",
    "RobertaForCausalLM",
    "NemotronHForCausalLM",
    "BloomForCausalLM",
]
# Built only: Zamba's transformer block is shared (tied) across layers, Blt freezes its patcher while building,
# Llama4 and Phimoe routers are Linear subclasses (the tiny Zamba fails a dense forward too).
BUILD_SAMPLE = ["ZambaForCausalLM", "Llama4ForCausalLM", "PhimoeForCausalLM", "CamembertForCausalLM"]


@pytest.mark.parametrize("name", FORWARD_SAMPLE)
def test_sweep_subset_agrees_and_runs(name: str) -> None:
    """Context == decorator == visitor; quantized paths match transformers or differ for a known reason; forward."""
    outcome = sweep.sweep_one(name, CONFIG, forward=True, timeout=60)
    assert outcome.status in ("ok", "differs"), (outcome.status, outcome.error, outcome.traceback)
    assert outcome.context_decorator_visitor, outcome.mismatch
    assert outcome.quantized > 0
    assert not any("unexplained" in reason or "dot boundary" in reason for reason in outcome.differences)
    assert outcome.forward == "finite", (outcome.forward, outcome.forward_reason)


@pytest.mark.parametrize("name", BUILD_SAMPLE)
def test_sweep_subset_builds_alike(name: str) -> None:
    outcome = sweep.sweep_one(name, CONFIG, timeout=60)
    assert outcome.status in ("ok", "differs"), (outcome.status, outcome.error, outcome.traceback)
    assert outcome.context_decorator_visitor, outcome.mismatch
    assert not any("unexplained" in reason or "dot boundary" in reason for reason in outcome.differences)


def test_every_causal_lm_is_enumerated() -> None:
    names = sweep.causal_lm_names()
    assert "LlamaForCausalLM" in names and "AutoModelForCausalLM" not in names
    assert all(isinstance(getattr(transformers, name), type) for name in names)


def test_falcon_linear_subclass_is_explained() -> None:
    outcome = sweep.sweep_one("FalconForCausalLM", CONFIG, timeout=60)
    assert outcome.status == "differs" and outcome.linear_subclasses == {"FalconLinear": 8}
    assert all("FalconLinear" in reason for reason in outcome.differences)


# ---------------------------------------------------------------------------------------------------------------
# BERT encoders (all-MiniLM-L6-v2's architecture)


def _minilm_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=1024
    )


def test_minilm_architecture_paths_agree_and_forward_is_finite() -> None:
    """BertModel with all-MiniLM-L6-v2's sizes (vocab cut to 1024): the three paths, transformers, a forward."""
    config = _minilm_config()
    skip = ["pooler.dense"]
    with aqlm_quantized(CONFIG, skip=skip):
        by_context = transformers.BertModel(config)
    by_decorator = quantize_model(CONFIG, skip=skip)(transformers.BertModel)(config)
    with torch.device("meta"):
        by_visitor = transformers.BertModel(config)
        theirs = transformers.BertModel(config)
    replace_linear_layers(by_visitor, CONFIG, skip=skip)
    sweep.transformers_replace(theirs, skip, CONFIG)
    assert signature(by_decorator) == signature(by_context) == signature(by_visitor)
    assert quantized_paths(by_context) == quantized_paths(theirs)
    assert len(quantized_paths(by_context)) == 6 * 6  # q, k, v, attention out, intermediate, output per layer
    load_tensors(by_context, random_tensors(by_context), dtype=torch.float32)
    with torch.no_grad():
        hidden = by_context(input_ids=torch.tensor([[101, 7, 8, 9, 102]])).last_hidden_state
    assert hidden.shape == (1, 5, 384) and torch.isfinite(hidden).all()


def test_bert_lm_head_with_tied_decoder_builds_under_the_context() -> None:
    """transformers expands BERT's tied names against named_parameters() while the model is being built."""
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128
    )
    config.is_decoder = True
    with aqlm_quantized(CONFIG):
        quantized = transformers.BertLMHeadModel(config)
    decoder = quantized.cls.predictions.decoder
    assert type(decoder) is QuantizedLinear and "weight" not in dict(decoder.named_parameters())
    assert decoder.bias is quantized.cls.predictions.bias  # the bias tie is kept
    with aqlm_quantized(CONFIG, skip=["cls.predictions.decoder"]):
        dense = transformers.BertLMHeadModel(config)
    assert dense.cls.predictions.decoder.weight is dense.bert.embeddings.word_embeddings.weight
    assert dense.cls.predictions.decoder.bias is dense.cls.predictions.bias


# ---------------------------------------------------------------------------------------------------------------
# Library behaviours the sweep found


def test_no_stand_in_weight_is_left_on_quantized_layers() -> None:
    with aqlm_quantized(CONFIG):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    assert all("weight" not in dict(m.named_parameters()) for m in model)
    with pytest.raises(RuntimeError), aqlm_quantized(CONFIG):
        failed = nn.Linear(16, 16)
        raise RuntimeError("boom")
    assert "weight" not in dict(failed.named_parameters())


def test_a_layer_frozen_while_built_stays_frozen_when_skipped() -> None:
    """A model that sets requires_grad = False on a sub-module in __init__ (BLT's patcher) keeps it frozen."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 16)
            for parameter in self.head.parameters():
                parameter.requires_grad = False

    with aqlm_quantized(CONFIG, skip=["head"]):
        model = Frozen()
    assert type(model.head) is nn.Linear and not model.head.weight.requires_grad
    assert not model.head.bias.requires_grad


class _SharedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight


def test_layers_sharing_one_weight_share_their_codes_in_every_path() -> None:
    with aqlm_quantized(CONFIG):
        by_context = _SharedWeights()
    with torch.device("meta"):
        by_visitor = _SharedWeights()
    replace_linear_layers(by_visitor, CONFIG)
    for model in (by_context, by_visitor):
        assert model.a.codes is model.b.codes and model.a.codebooks is model.b.codebooks
        assert model.a.bias is not model.b.bias
    assert signature(by_context) == signature(by_visitor)


# ---------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention models and GPT-2's Conv1D


def test_transformer_encoder_layer_out_proj_stays_and_forward_runs() -> None:
    """MHA reads ``out_proj.weight`` itself, so its out_proj (a Linear subclass) stays dense; the rest is quantized.

    Limitation: in eval mode PyTorch's fused encoder fast path reads ``linear1.weight`` / ``linear2.weight``
    directly, so inference needs ``torch.backends.mha.set_fastpath_enabled(False)`` (or skip linear1/linear2).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor advice from nn.TransformerEncoder
        with aqlm_quantized(CONFIG):
            model = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True), num_layers=2
            )
    for layer in model.layers:
        assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert quantized_paths(model) == {f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")}
    load_tensors(model, random_tensors(model), dtype=torch.float32)
    model.eval()
    x = torch.randn(1, 5, 64)
    with torch.no_grad(), pytest.raises(AttributeError, match="weight"):
        model(x)  # the fused fast path
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
    assert out.shape == (1, 5, 64) and torch.isfinite(out).all()


def test_gpt2_conv1d_is_left_alone() -> None:
    """GPT-2's attention and MLP use transformers' ``Conv1D`` (weight stored [in, out]), not ``nn.Linear``.

    aqlm_ctx converts exact ``nn.Linear`` only, so by default GPT-2's c_attn, c_proj and c_fc stay dense and only
    lm_head (an ``nn.Linear``) can be quantized; transformers' replace_with_aqlm_linear does the same.
    """
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        skipped = transformers.GPT2LMHeadModel(config)
    assert quantized_paths(skipped) == set()
    with aqlm_quantized(CONFIG):
        model = transformers.GPT2LMHeadModel(config)
    assert quantized_paths(model) == {"lm_head"}
    conv = [path for path, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv) == 4 * 2
    load_tensors(model, random_tensors(model), dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()

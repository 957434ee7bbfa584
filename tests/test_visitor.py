"""replace_linear_layers and the seed-compatible replace_with_aqlm_linear."""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

import pytest
import torch
from aqlm import QuantizedLinear
from torch import nn

from aqlm_ctx import AqlmConfig, load_tensors, replace_linear_layers, replace_with_aqlm_linear
from aqlm_ctx.testing import random_tensors

from .test_construction import CONFIG, TinyLM
from .utils import dense_weight, linear_paths, quantized_paths


def test_real_model_becomes_meta_quantized_and_old_weights_are_released() -> None:
    model = TinyLM(tie=False)
    old_weight = weakref.ref(model.layers[0]["q"].weight)
    layer = model.layers[0]["q"]
    hook_calls: list[int] = []
    layer.register_forward_pre_hook(lambda module, args: hook_calls.append(1))
    assert replace_linear_layers(model, CONFIG, skip=["lm_head"]) is model
    gc.collect()
    assert old_weight() is None
    assert model.layers[0]["q"] is layer and type(layer) is QuantizedLinear  # same object, converted in place
    assert len(layer._forward_pre_hooks) == 1
    assert layer.codes.device.type == "meta" and layer.codebooks.dtype is torch.float32
    assert model.embed.weight.device.type == "cpu" and type(model.lm_head) is nn.Linear
    assert quantized_paths(model) == {f"layers.{i}.{n}" for i in range(2) for n in ("q", "fc")}


def test_weight_dtype_is_kept_unless_config_sets_one() -> None:
    model = TinyLM(tie=False).to(torch.float16)
    replace_linear_layers(model, CONFIG)
    assert model.layers[0]["q"].codebooks.dtype is torch.float16
    model = TinyLM(tie=False).to(torch.float16)
    replace_linear_layers(model, CONFIG.replace(dtype=torch.float32))
    assert model.layers[0]["q"].scales.dtype is torch.float32


def test_logs_how_many_layers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="aqlm_ctx"):
        replace_linear_layers(TinyLM(tie=False), CONFIG, skip=["lm_head"])
    assert "replaced 4 Linear layers" in caplog.text and "1 kept dense" in caplog.text


def test_not_divisible_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(12, 16))
    with pytest.raises(ValueError, match=r"(?s)1: Linear\(12, 16\).*in_group_size=8.*skip.*not changed"):
        replace_linear_layers(model, CONFIG)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    replace_linear_layers(model, CONFIG, skip=["1"])
    assert [type(m) for m in model] == [QuantizedLinear, nn.Linear]


def test_shared_linear_is_converted_once_and_stays_shared() -> None:
    shared = nn.Linear(16, 16)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    replace_linear_layers(model, CONFIG)
    assert model["a"][0] is model["b"][0] and type(model["a"][0]) is QuantizedLinear


def test_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        replace_linear_layers("model", CONFIG)  # type: ignore[arg-type]


def test_seed_signature_and_return() -> None:
    model = TinyLM(tie=False)
    result, replaced = replace_with_aqlm_linear(
        model, quantization_config=CONFIG, linear_weights_not_to_quantize=["lm_head.weight"]
    )
    assert result is model and replaced is True
    assert type(model.lm_head) is nn.Linear and model.layers[0]["q"].source_cls is nn.Linear
    assert replace_with_aqlm_linear(nn.Sequential(nn.ReLU()), CONFIG)[1] is False
    assert replace_with_aqlm_linear(nn.Sequential(nn.ReLU()), CONFIG, has_been_replaced=True)[1] is True


def test_seed_current_key_name_prefixes_paths() -> None:
    inner = nn.ModuleDict({"q": nn.Linear(16, 16), "k": nn.Linear(16, 16)})
    replace_with_aqlm_linear(inner, CONFIG, ["model.layers.0.k.weight"], current_key_name=["model", "layers", "0"])
    assert type(inner["q"]) is QuantizedLinear and type(inner["k"]) is nn.Linear


def test_seed_accepts_transformers_config_and_fixes_its_lm_head_skip() -> None:
    import transformers

    theirs = transformers.AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
    model, _ = replace_with_aqlm_linear(TinyLM(tie=False), theirs, ["lm_head.weight"])
    assert linear_paths(model) == {"lm_head"}
    assert model.layers[1]["fc"].num_codebooks == 2


def test_default_config_is_1x16() -> None:
    model = replace_linear_layers(nn.Sequential(nn.Linear(16, 16)))
    assert model[0].nbits_per_codebook == 16 and model[0].codes.dtype is torch.int16
    assert AqlmConfig().format_name == "1x16 g8"


def test_a_layer_with_an_accelerate_hook_runs_its_quantized_forward() -> None:
    """accelerate's hooks (dispatch_model, cpu_offload) keep the layer's forward from when they were added."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            Count.calls += 1
            return args, kwargs

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    add_hook_to_module(model[0], Count())
    replace_linear_layers(model, CONFIG)
    load_tensors(model, random_tensors(model))
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = model(x)
        expected = model[2](torch.relu(x @ dense_weight(model[0]).float().T + model[0].bias))
    assert Count.calls == 1 and torch.allclose(out, expected, atol=1e-5)


def test_replace_with_aqlm_linear_takes_every_call_form_of_the_seed_and_transformers_5() -> None:
    from types import SimpleNamespace

    fields = SimpleNamespace(in_group_size=8, out_group_size=1, num_codebooks=2, nbits_per_codebook=8)
    model, replaced = replace_with_aqlm_linear(TinyLM(tie=False), fields, ["lm_head.weight"])  # seed: attributes only
    assert replaced and type(model.lm_head) is nn.Linear and type(model.layers[0]["q"]) is QuantizedLinear
    assert model.layers[0]["q"].num_codebooks == 2
    model, replaced = replace_with_aqlm_linear(
        TinyLM(tie=False), quantization_config=CONFIG, modules_to_not_convert=["lm_head"]
    )  # transformers 5's keywords
    assert replaced and type(model.lm_head) is nn.Linear
    root = nn.Linear(16, 16)
    assert replace_with_aqlm_linear(root, CONFIG) == (root, False) and type(root) is nn.Linear  # children only

"""AqlmConfig: defaults, validation, the hub and transformers forms, and as_config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from aqlm_ctx import AqlmConfig, as_config


def test_defaults_match_transformers() -> None:
    import transformers

    ours, theirs = AqlmConfig(), transformers.AqlmConfig()
    for field in ("in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook"):
        assert getattr(ours, field) == getattr(theirs, field)
    assert ours.dtype is None and ours.skip == ()


def test_frozen() -> None:
    config = AqlmConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.in_group_size = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "error", "words"),
    [
        ("in_group_size", 0, ValueError, ">= 1"),
        ("out_group_size", -2, ValueError, ">= 1"),
        ("num_codebooks", 0, ValueError, ">= 1"),
        ("nbits_per_codebook", 0, ValueError, "1..16"),
        ("nbits_per_codebook", 17, ValueError, "1..16"),
        ("in_group_size", 8.0, TypeError, "int"),
        ("num_codebooks", "2", TypeError, "int"),
        ("nbits_per_codebook", True, TypeError, "int"),
        ("dtype", torch.int8, ValueError, "floating"),
        ("dtype", torch.float8_e4m3fn, ValueError, "float16, bfloat16, float32, float64"),
        ("dtype", "float17", ValueError, "float16"),
        ("dtype", 16, TypeError, "torch.dtype"),
        ("skip", 3, TypeError, "skip"),
        ("skip", [""], ValueError, "empty"),
        ("skip", ["re:("], ValueError, "regular expression"),
        ("skip", [["lm_head"]], TypeError, "strings or callables"),
    ],
)
def test_invalid_values_name_field_allowed_and_given(field: str, value: object, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        AqlmConfig(**{field: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert field in message and words in message
    if field != "skip":
        assert repr(value) in message or str(value) in message


def test_dtype_names_and_skip_lists_are_normalised() -> None:
    config = AqlmConfig(dtype="torch.bfloat16", skip=["lm_head"])  # type: ignore[arg-type]
    assert config.dtype is torch.bfloat16 and config.skip == ("lm_head",)
    assert AqlmConfig(skip="lm_head").skip == ("lm_head",)  # type: ignore[arg-type]
    assert hash(config) == hash(AqlmConfig(dtype=torch.bfloat16, skip=("lm_head",)))


def test_derived_properties() -> None:
    config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
    assert (config.codebook_size, config.code_dtype, config.bits_per_weight) == (256, torch.int8, 2.0)
    assert config.format_name == "2x8 g8"
    assert AqlmConfig().code_dtype is torch.int16


HUB_BLOCK = {
    "quant_method": "aqlm",
    "in_group_size": 8,
    "out_group_size": 1,
    "num_codebooks": 2,
    "nbits_per_codebook": 8,
    "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"],
}


def test_from_dict_reads_hub_block() -> None:
    config = AqlmConfig.from_dict(HUB_BLOCK)
    assert (config.num_codebooks, config.nbits_per_codebook) == (2, 8)
    assert config.skip == ("model.embed_tokens.weight", "lm_head.weight")
    both = AqlmConfig.from_dict({**HUB_BLOCK, "modules_to_not_convert": ["gate"]})
    assert both.skip[-1] == "gate"


def test_from_dict_errors() -> None:
    with pytest.raises(ValueError, match="unknown key.*bits_per_weight"):
        AqlmConfig.from_dict({**HUB_BLOCK, "bits_per_weight": 2})
    with pytest.raises(ValueError, match="quant_method must be 'aqlm', got 'gptq'"):
        AqlmConfig.from_dict({**HUB_BLOCK, "quant_method": "gptq"})
    with pytest.raises(TypeError, match="mapping"):
        AqlmConfig.from_dict(["aqlm"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="linear_weights_not_to_quantize"):
        AqlmConfig.from_dict({**HUB_BLOCK, "linear_weights_not_to_quantize": "lm_head.weight"})
    with pytest.raises(ValueError, match="nbits_per_codebook"):
        AqlmConfig.from_dict({**HUB_BLOCK, "nbits_per_codebook": 32})


def test_from_pretrained_directory_file_and_legacy(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": HUB_BLOCK}))
    assert AqlmConfig.from_pretrained(tmp_path) == AqlmConfig.from_dict(HUB_BLOCK)
    assert AqlmConfig.from_pretrained(tmp_path / "config.json") == AqlmConfig.from_dict(HUB_BLOCK)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    block = {key: value for key, value in HUB_BLOCK.items() if key != "quant_method"}
    (legacy / "config.json").write_text(json.dumps({"model_type": "llama_aqlm", "aqlm": block}))
    assert AqlmConfig.from_pretrained(legacy) == AqlmConfig.from_dict(HUB_BLOCK)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AqlmConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AqlmConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no AQLM quantization config"):
        AqlmConfig.from_pretrained(tmp_path)


def test_transformers_config_converts() -> None:
    import transformers

    theirs = transformers.AqlmConfig(num_codebooks=2, nbits_per_codebook=8, linear_weights_not_to_quantize=["x.weight"])
    config = as_config(theirs)
    assert (config.num_codebooks, config.nbits_per_codebook, config.skip) == (2, 8, ("x.weight",))
    assert AqlmConfig.from_dict(theirs.to_dict()) == config  # quant_method is an Enum member there


def test_as_config_accepts_every_form(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": HUB_BLOCK}))
    expected = AqlmConfig.from_dict(HUB_BLOCK)
    for form in (expected, HUB_BLOCK, str(tmp_path), tmp_path, tmp_path / "config.json"):
        assert as_config(form) == expected
    assert as_config(None) == AqlmConfig()
    with pytest.raises(TypeError, match="expected an AqlmConfig"):
        as_config(42)


def test_with_skip_appends() -> None:
    config = AqlmConfig(skip=["a"]).with_skip(["b"])
    assert config.skip == ("a", "b")
    assert config.with_skip(None) is config


def test_a_quantization_config_as_a_json_string_is_a_value_error() -> None:
    block = json.dumps({"quant_method": "aqlm", "num_codebooks": 2, "nbits_per_codebook": 8, "skip": ["x" * 300]})
    with pytest.raises(ValueError, match="expected a checkpoint directory path, got .*pass a quantization_config dict"):
        as_config(block)


def test_from_dict_drops_the_converters_bias_entries_of_quantized_layers() -> None:
    """AQLM's converter lists every parameter but the quantized weights: a bias whose layer the lists do not name
    belongs to a quantized layer and is dropped; a bias beside its dense layer's weight stays."""
    config = AqlmConfig.from_dict(
        {
            "quant_method": "aqlm",
            "linear_weights_not_to_quantize": [
                "model.layers.0.self_attn.q_proj.bias",
                "model.layers.0.input_layernorm.weight",
                "lm_head.weight",
                "lm_head.bias",
            ],
            "modules_to_not_convert": ["score", "score.bias"],
        }
    )
    assert config.skip == (
        "model.layers.0.input_layernorm.weight",
        "lm_head.weight",
        "lm_head.bias",
        "score",
        "score.bias",
    )
    assert AqlmConfig(skip=["q_proj.bias"]).skip == ("q_proj.bias",)  # patterns given directly keep their meaning


def test_same_format_takes_any_config_form() -> None:
    config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
    assert config.same_format({"quant_method": "aqlm", "num_codebooks": 2, "nbits_per_codebook": 8})
    assert not config.same_format({"quant_method": "aqlm"})
    with pytest.raises(TypeError, match="expected an AqlmConfig"):
        config.same_format(42)


def test_skip_as_a_mapping_is_refused() -> None:
    with pytest.raises(
        TypeError, match="AqlmConfig.skip must be a list of module path patterns or callables, got dict"
    ):
        AqlmConfig(skip={"lm_head": True})

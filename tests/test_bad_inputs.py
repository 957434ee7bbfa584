"""Bad inputs: every case of docs/errors.md raises its documented exception with a message naming what and where.

Checkpoints are written with ``save_checkpoint`` in temporary directories and then corrupted (truncated bytes,
tensors rewritten with another dtype, shape or name). The config parser is fuzzed with hypothesis: only ``TypeError``,
``ValueError`` and ``FileNotFoundError`` may come out. The security cases check that no code from a checkpoint ever
runs: pickles are refused by default and read with ``weights_only=True`` otherwise, and ``auto_map`` modules in a
checkpoint directory are never imported.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import aqlm_ctx
from aqlm_ctx import (
    AqlmConfig,
    aqlm_quantized,
    as_config,
    from_pretrained,
    load_checkpoint,
    quantize_model,
    replace_linear_layers,
    save_checkpoint,
)
from aqlm_ctx.testing import random_tensors

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 32, bias=False)


def skeleton(config: AqlmConfig = CONFIG) -> Net:
    with aqlm_quantized(config, skip=["lm_head"]):
        return Net()


def write_checkpoint(directory: Path, config: AqlmConfig = CONFIG) -> Path:
    model = skeleton(config)
    aqlm_ctx.load_tensors(model, random_tensors(model))
    save_checkpoint(model, directory)
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def ckpt(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a good 2x8 checkpoint of ``Net`` to corrupt."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def rewrite(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def edit_config(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((directory / "config.json").read_text())
    change(data)
    (directory / "config.json").write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------------------
# The cases. Each gets the path of a fresh checkpoint copy; most ignore it.


def _config_json(path: Path, text: str) -> Path:
    (path / "config.json").write_text(text)
    return path


def _truncate(ckpt: Path) -> None:
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    load_checkpoint(skeleton(), ckpt)


def _bad_header(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    load_checkpoint(skeleton(), ckpt)


def _codes_dtype(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.update({"proj.codes": t["proj.codes"].to(torch.int16)}))
    load_checkpoint(skeleton(), ckpt)


def _codes_float(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.update({"proj.codes": t["proj.codes"].to(torch.float32)}))
    load_checkpoint(skeleton(), ckpt)


def _scales_int(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.update({"proj.scales": t["proj.scales"].to(torch.int32)}))
    load_checkpoint(skeleton(), ckpt)


def _shape(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.update({"proj.codes": t["proj.codes"][:8].contiguous()}))
    load_checkpoint(skeleton(), ckpt)


def _missing(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.pop("proj.scales"))
    load_checkpoint(skeleton(), ckpt)


def _unexpected(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    load_checkpoint(skeleton(), ckpt)


def _renamed(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.update({"model.proj.codes": t.pop("proj.codes")}))
    load_checkpoint(skeleton(), ckpt)


def _pickle_only(ckpt: Path) -> None:
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    load_checkpoint(skeleton(), ckpt)


def _other_format(ckpt: Path) -> None:
    shutil.rmtree(ckpt)
    write_checkpoint(ckpt, AqlmConfig())  # 1x16 g8, loaded into a 2x8 skeleton
    load_checkpoint(skeleton(), ckpt)


def _empty_dir(ckpt: Path) -> None:
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    load_checkpoint(skeleton(), ckpt)


def _bad_index(ckpt: Path) -> None:
    (ckpt / "model.safetensors.index.json").write_text('{"metadata": {}}')
    load_checkpoint(skeleton(), ckpt)


def _index_missing_shard(ckpt: Path) -> None:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"proj.codes": "shard-9.st"}}))
    load_checkpoint(skeleton(), ckpt)


def _index_wrong_shard(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[:3]}, ckpt / "model-00001-of-00002.safetensors")
    save_file({name: tensors[name] for name in names[3:]}, ckpt / "model-00002-of-00002.safetensors")
    (ckpt / "model.safetensors").unlink()
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}  # all in the first shard: wrong
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    load_checkpoint(skeleton(), ckpt)


def _no_quant_block(ckpt: Path) -> None:
    edit_config(ckpt, lambda data: data.pop("quantization_config"))
    from_pretrained(ckpt, model_fn=Net)


def _other_quant_method(ckpt: Path) -> None:
    edit_config(ckpt, lambda data: data["quantization_config"].update(quant_method="gptq"))
    from_pretrained(ckpt, model_fn=Net)


def _model_fn_not_module(ckpt: Path) -> None:
    from_pretrained(ckpt, model_fn=lambda: "model")


def _scales_float8(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.update({"proj.scales": t["proj.scales"].to(torch.float8_e4m3fn)}))
    load_checkpoint(skeleton(), ckpt)


def _from_pretrained_typo(ckpt: Path) -> None:
    from_pretrained(ckpt, model_fn=skeleton, devce="cpu")


def _unknown_architecture(ckpt: Path) -> None:
    edit_config(ckpt, lambda data: data.update(architectures=["NoSuchModelForCausalLM"], model_type="llama"))
    from_pretrained(ckpt)


def _not_divisible_context(ckpt: Path) -> None:
    with aqlm_quantized(CONFIG):
        nn.ModuleDict({"ok": nn.Linear(16, 16), "odd": nn.Linear(12, 16)})


def _not_divisible_out(ckpt: Path) -> None:
    with aqlm_quantized(CONFIG.replace(out_group_size=4)):
        nn.ModuleDict({"odd": nn.Linear(16, 10)})


def _parametrized_context(ckpt: Path) -> None:
    with aqlm_quantized(CONFIG):
        nn.ModuleDict({"head": nn.utils.parametrizations.weight_norm(nn.Linear(16, 16))})


def _old_spectral_norm_context(ckpt: Path) -> None:
    with aqlm_quantized(CONFIG, skip=["head"]):  # skipped too: the hook reads weight_orig, which it no longer has
        nn.ModuleDict({"body": nn.Linear(16, 16), "head": nn.utils.spectral_norm(nn.Linear(16, 16))})


def _pruned_context(ckpt: Path) -> None:
    with aqlm_quantized(CONFIG):
        nn.ModuleDict({"head": nn.utils.prune.random_unstructured(nn.Linear(16, 16), "weight", amount=0.5)})


def _not_divisible_visitor(ckpt: Path) -> None:
    replace_linear_layers(nn.ModuleDict({"ok": nn.Linear(16, 16), "odd": nn.Linear(12, 16)}), CONFIG)


def _bare_decorator(ckpt: Path) -> None:
    @quantize_model  # type: ignore[arg-type]
    def build() -> nn.Module:
        return Net()


def _decorate_non_callable(ckpt: Path) -> None:
    quantize_model(CONFIG)(42)  # type: ignore[type-var]


def _factory_returns_int(ckpt: Path) -> None:
    @quantize_model(CONFIG)
    def build_count() -> int:
        return 3

    build_count()


def _device_and_map(ckpt: Path) -> None:
    load_checkpoint(skeleton(), ckpt, device="cpu", device_map={"": "cpu"})


def _device_map_disk(ckpt: Path) -> None:
    load_checkpoint(skeleton(), ckpt, device_map={"embed": "cpu", "proj": "cpu", "lm_head": "disk"})


def _load_dtype(ckpt: Path) -> None:
    load_checkpoint(skeleton(), ckpt, dtype="int8")


def _forward_before_load(ckpt: Path) -> None:
    skeleton().proj(torch.randn(2, 16))


# (id, action, exception type, regex the message must match: what was wrong and where)
CASES: list[tuple[str, Callable[[Path], Any], type[Exception], str]] = [
    # -- configs
    (
        "config-in-group-zero",
        lambda p: AqlmConfig(in_group_size=0),
        ValueError,
        r"AqlmConfig\.in_group_size .*>= 1, got 0",
    ),
    ("config-out-group-negative", lambda p: AqlmConfig(out_group_size=-2), ValueError, r"out_group_size .*got -2"),
    ("config-codebooks-zero", lambda p: AqlmConfig(num_codebooks=0), ValueError, r"num_codebooks must be an int >= 1"),
    (
        "config-nbits-17",
        lambda p: AqlmConfig(nbits_per_codebook=17),
        ValueError,
        r"nbits_per_codebook .*1\.\.16, got 17",
    ),
    ("config-nbits-zero", lambda p: AqlmConfig(nbits_per_codebook=0), ValueError, r"nbits_per_codebook .*1\.\.16"),
    ("config-group-str", lambda p: AqlmConfig(in_group_size="8"), TypeError, r"in_group_size .*got '8' \(str\)"),
    ("config-codebooks-bool", lambda p: AqlmConfig(num_codebooks=True), TypeError, r"num_codebooks .*\(bool\)"),
    ("config-nbits-float", lambda p: AqlmConfig(nbits_per_codebook=8.0), TypeError, r"nbits_per_codebook .*\(float\)"),
    ("config-dtype-int", lambda p: AqlmConfig(dtype="int8"), ValueError, r"dtype must be a floating dtype.*int8"),
    ("config-dtype-unknown", lambda p: AqlmConfig(dtype="float17"), ValueError, r"dtype must name .*'float17'"),
    ("config-dtype-type", lambda p: AqlmConfig(dtype=16), TypeError, r"dtype must be a torch\.dtype.*got 16"),
    (
        "dict-unknown-key",
        lambda p: AqlmConfig.from_dict({"quant_method": "aqlm", "nbit_per_codebook": 8}),
        ValueError,
        r"unknown key\(s\) .*nbit_per_codebook.*allowed:.*nbits_per_codebook",
    ),
    (
        "dict-quant-method",
        lambda p: AqlmConfig.from_dict({"quant_method": "gptq"}),
        ValueError,
        r"quant_method must be 'aqlm', got 'gptq'",
    ),
    ("dict-not-mapping", lambda p: AqlmConfig.from_dict([("a", 1)]), TypeError, r"from_dict needs a mapping, got list"),
    (
        "dict-skip-string",
        lambda p: AqlmConfig.from_dict({"linear_weights_not_to_quantize": "lm_head.weight"}),
        TypeError,
        r"'linear_weights_not_to_quantize' must be a list of names",
    ),
    ("as-config-int", lambda p: as_config(42), TypeError, r"expected an AqlmConfig.*got int"),
    ("as-config-missing-path", lambda p: as_config(p / "nowhere"), FileNotFoundError, r"no config\.json at .*nowhere"),
    (
        "config-json-invalid",
        lambda p: as_config(_config_json(p, "{not json")),
        ValueError,
        r"config\.json is not valid JSON",
    ),
    (
        "config-json-array",
        lambda p: as_config(_config_json(p, "[1]")),
        ValueError,
        r"config\.json must hold a JSON object",
    ),
    (
        "config-json-no-block",
        lambda p: as_config(_config_json(p, '{"model_type": "llama"}')),
        ValueError,
        r"config\.json has no AQLM quantization config",
    ),
    # -- skip patterns
    (
        "skip-int",
        lambda p: AqlmConfig(skip=[3]),
        TypeError,
        r"skip entries must be strings or callables.*got 3 \(int\)",
    ),
    ("skip-not-iterable", lambda p: aqlm_quantized(CONFIG, skip=3.5), TypeError, r"skip must be a list.*got float"),
    (
        "skip-bad-regex",
        lambda p: AqlmConfig(skip=["re:layers.(1"]),
        ValueError,
        r"'re:layers\.\(1' is not a valid regular",
    ),
    ("skip-empty", lambda p: AqlmConfig(skip=[""]), ValueError, r"skip has an empty pattern"),
    (
        "skip-empty-regex",
        lambda p: AqlmConfig(skip=["re:"]),
        ValueError,
        r"pattern 're:' has an empty regular expression, which matches the model root",
    ),
    (
        "skip-blank",
        lambda p: replace_linear_layers(Net(), CONFIG, skip=["  "]),
        ValueError,
        r"skip has an empty pattern",
    ),
    # -- layers that do not fit the groups
    (
        "context-not-divisible",
        _not_divisible_context,
        ValueError,
        r"odd \(built at .*test_bad_inputs\.py:\d+\): Linear\(12, 16\): in_features=12 is not divisible by "
        r"in_group_size=8(?s:.*)add them to skip",
    ),
    (
        "context-out-not-divisible",
        _not_divisible_out,
        ValueError,
        r"odd .*Linear\(16, 10\): out_features=10 is not divisible by out_group_size=4",
    ),
    (
        "context-parametrized",
        _parametrized_context,
        ValueError,
        r"were reparametrized \(torch\.nn\.utils\.parametrize.*\n  head \(built at .*test_bad_inputs\.py:\d+\)",
    ),
    (
        "context-old-spectral-norm",
        _old_spectral_norm_context,
        ValueError,
        r"were reparametrized \(.*older torch\.nn\.utils\.weight_norm / spectral_norm hooks.*\n  head \(built at ",
    ),
    (
        "context-pruned",
        _pruned_context,
        ValueError,
        r"were reparametrized \(.*torch\.nn\.utils\.prune\).*\n  head \(built at ",
    ),
    (
        "visitor-not-divisible",
        _not_divisible_visitor,
        ValueError,
        r"odd: Linear\(12, 16\): in_features=12 is not divisible by in_group_size=8(?s:.*)model was not changed",
    ),
    (
        "visitor-not-module",
        lambda p: replace_linear_layers({"a": 1}, CONFIG),
        TypeError,
        r"torch\.nn\.Module.*got dict",
    ),
    # -- checkpoints
    ("ckpt-missing-tensor", _missing, ValueError, r"missing from the checkpoint:\s+proj\.scales"),
    (
        "ckpt-unexpected-tensor",
        _unexpected,
        ValueError,
        r"unexpected in the checkpoint \(pass strict=False.*\s+extra\.weight",
    ),
    (
        "ckpt-renamed-tensor",
        _renamed,
        ValueError,
        r"missing from the checkpoint:\s+proj\.codes(?s:.*)model\.proj\.codes",
    ),
    ("ckpt-truncated", _truncate, ValueError, r"model\.safetensors is not a readable safetensors file \(truncated"),
    ("ckpt-garbage", _bad_header, ValueError, r"model\.safetensors is not a readable safetensors file"),
    (
        "ckpt-codes-dtype",
        _codes_dtype,
        ValueError,
        r"proj\.codes: codes are torch\.int16 in the checkpoint, but nbits_per_codebook=8 needs torch\.int8",
    ),
    ("ckpt-codes-float", _codes_float, ValueError, r"proj\.codes: codes are torch\.float32 in the checkpoint"),
    (
        "ckpt-scales-int",
        _scales_int,
        ValueError,
        r"proj\.scales: dtype torch\.int32 in the checkpoint, the model expects",
    ),
    (
        "ckpt-wrong-shape",
        _shape,
        ValueError,
        r"proj\.codes: shape \[8, 2, 2\] in the checkpoint, the model expects \[16",
    ),
    (
        "ckpt-pickle-refused",
        _pickle_only,
        ValueError,
        r"holds only pickle weights \(pytorch_model\.bin\).*allow_pickle",
    ),
    (
        "ckpt-empty-dir",
        _empty_dir,
        FileNotFoundError,
        r"no weights in .*ckpt: expected model\.safetensors.*found nothing",
    ),
    ("ckpt-no-dir", lambda p: load_checkpoint(Net(), p / "nope"), FileNotFoundError, r"'.*nope' does not exist"),
    ("ckpt-bad-index", _bad_index, ValueError, r"index\.json is not a valid shard index.*weight_map"),
    (
        "ckpt-index-missing-shard",
        _index_missing_shard,
        FileNotFoundError,
        r"lists shard files that do not exist: shard-9",
    ),
    (
        "ckpt-other-format",
        _other_format,
        ValueError,
        r"proj: the model's layer is 2x8 g8 but the checkpoint was quantized with 1x16 g8",
    ),
    ("ckpt-no-quant-block", _no_quant_block, ValueError, r"config\.json has no AQLM quantization config"),
    (
        "ckpt-index-wrong-shard",
        _index_wrong_shard,
        ValueError,
        r"index\.json maps tensor proj\.codebooks to model-00001-of-00002\.safetensors, which does not hold it",
    ),
    (
        "ckpt-other-quant-method",
        _other_quant_method,
        ValueError,
        r"config\.json: the checkpoint is quantized with quant_method 'gptq', not AQLM",
    ),
    (
        "ckpt-unknown-architecture",
        _unknown_architecture,
        ValueError,
        r"names architecture \['NoSuchModelForCausalLM'\]",
    ),
    ("ckpt-model-fn-not-module", _model_fn_not_module, TypeError, r"model_fn returned str, not a torch\.nn\.Module"),
    (
        "ckpt-scales-float8",
        _scales_float8,
        ValueError,
        r"model\.safetensors: tensor proj\.scales has dtype F8_E4M3, which aqlm_ctx does not read \(supported: F64",
    ),
    (
        "ckpt-from-pretrained-typo",
        _from_pretrained_typo,
        TypeError,
        r"from_pretrained\(\) got unexpected keyword arguments: devce",
    ),
    ("load-device-and-map", _device_and_map, ValueError, r"pass either device or device_map"),
    (
        "load-device-map-list",
        lambda p: from_pretrained(p, model_fn=Net, device_map=["cpu"]),
        TypeError,
        r"device_map must be one of 'auto', .*a device \(0, 'cuda:1', torch\.device\) or a dict .*got \['cpu'\]",
    ),
    (
        "ckpt-weight-file-path",
        lambda p: from_pretrained(p / "model.safetensors", model_fn=Net),
        ValueError,
        r"model\.safetensors' is a file, not a checkpoint's config\.json: pass the checkpoint directory",
    ),
    ("load-device-map-disk", _device_map_disk, ValueError, r"device_map puts lm_head on 'disk', which aqlm_ctx"),
    ("load-dtype-int", _load_dtype, ValueError, r"^dtype must be a floating dtype .*got torch\.int8"),
    (
        "forward-before-load",
        _forward_before_load,
        RuntimeError,
        r"AQLM layer \(16x16\) was called with an input on cpu while its codes are on the meta device.*load a "
        r"checkpoint into it first",
    ),
    # -- decorator misuse
    ("decorator-bare", _bare_decorator, TypeError, r"needs a config: write @quantize_model\(config.*above .*build"),
    ("decorator-non-callable", _decorate_non_callable, TypeError, r"decorates a callable model factory, got int"),
    (
        "decorator-returns-int",
        _factory_returns_int,
        TypeError,
        r"build_count is decorated .* returned int, not a torch",
    ),
]


@pytest.mark.parametrize(("case", "action", "error", "message"), CASES, ids=[case[0] for case in CASES])
def test_bad_input(case: str, action: Callable[[Path], Any], error: type[Exception], message: str, ckpt: Path) -> None:
    with pytest.raises(error) as info:
        action(ckpt)
    assert type(info.value) is error  # exactly the documented type, not a subclass
    assert re.search(message, str(info.value)), f"{case}: {info.value}"


def test_every_case_is_documented() -> None:
    text = DOC.read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.MULTILINE)
    assert sorted(rows) == sorted(case[0] for case in CASES)
    assert len(rows) >= 30


# ---------------------------------------------------------------------------------------------------------------
# Inputs that are accepted (with a warning where documented).


def test_unexpected_tensor_with_strict_false_is_a_warning(ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    rewrite(ckpt, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    with caplog.at_level(logging.WARNING, logger="aqlm_ctx"):
        model = load_checkpoint(skeleton(), ckpt, strict=False)
    assert "ignored 1 unexpected tensors" in caplog.text and "extra.weight" in caplog.text
    assert model.proj.codes.device.type == "cpu"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_checkpoint_loads_with_allow_pickle(ckpt: Path, zip_format: bool) -> None:
    """Both torch.save formats: the zip archive (memory-mapped) and the one before torch 1.6 (read whole)."""
    expected = load_file(ckpt / "model.safetensors")
    torch.save(expected, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    (ckpt / "model.safetensors").unlink()
    model = load_checkpoint(skeleton(), ckpt, allow_pickle=True)
    assert torch.equal(model.proj.codes, expected["proj.codes"])
    assert torch.equal(model.lm_head.weight, expected["lm_head.weight"])


def test_legacy_config_is_read(tmp_path: Path) -> None:
    legacy = {
        "model_type": "llama_aqlm",
        "aqlm": {"in_group_size": 8, "out_group_size": 1, "num_codebooks": 2, "nbits_per_codebook": 8},
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert AqlmConfig.from_pretrained(tmp_path) == CONFIG
    assert as_config(tmp_path / "config.json") == CONFIG


def test_transformers_enum_quant_method_and_skip_forms_are_read() -> None:
    transformers = pytest.importorskip("transformers")
    hub = transformers.AqlmConfig(linear_weights_not_to_quantize=["lm_head.weight"])
    config = as_config(hub)
    assert config.skip == ("lm_head.weight",) and config.format_name == "1x16 g8"
    assert as_config(hub.to_dict()).same_format(config)


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing the config parser: only TypeError / ValueError / FileNotFoundError.

ALLOWED = (TypeError, ValueError, FileNotFoundError)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-40, 40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(
    [
        "quant_method",
        "dtype",
        "in_group_size",
        "out_group_size",
        "num_codebooks",
        "nbits_per_codebook",
        "linear_weights_not_to_quantize",
        "modules_to_not_convert",
        "skip",
    ]
) | st.text(max_size=8)
special = st.sampled_from(["aqlm", "AQLM", "gptq", "float16", "torch.bfloat16", "int8", "re:(", "re:.*", "", "*"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, json_values | special | st.lists(special, max_size=3), max_size=6))
def test_fuzz_from_dict(data: dict[str, Any]) -> None:
    try:
        config = AqlmConfig.from_dict(data)
    except ALLOWED:
        return
    assert isinstance(config, AqlmConfig) and 1 <= config.nbits_per_codebook <= 16


field_names = st.sampled_from(
    ["in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook", "dtype", "skip"]
)
objects = (
    json_values
    | special
    | st.sampled_from([torch.float16, torch.int8, torch.bool, object(), b"bytes", Path("."), len, 2**70, -(2**70)])
    | st.lists(special | st.integers() | st.just(len), max_size=3)
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(field_names, objects, max_size=6))
def test_fuzz_constructor(kwargs: dict[str, Any]) -> None:
    try:
        config = AqlmConfig(**kwargs)
    except ALLOWED:
        return
    assert config.dtype is None or config.dtype.is_floating_point
    assert all(isinstance(p, str) or callable(p) for p in config.skip)


@settings(max_examples=150, deadline=None)
@given(objects | st.dictionaries(keys, objects, max_size=4))
def test_fuzz_as_config(value: Any) -> None:
    try:
        config = as_config(value)
    except ALLOWED:
        return
    assert isinstance(config, AqlmConfig)


# ---------------------------------------------------------------------------------------------------------------
# Security: nothing from a checkpoint is ever executed.


class _Payload:
    """Unpickling this runs ``exec`` of code that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _malicious_pickle(directory: Path, marker: Path) -> None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (directory / name).unlink(missing_ok=True)
    torch.save({"proj.codes": _Payload(marker)}, directory / "pytorch_model.bin")


def test_malicious_pickle_is_refused_without_allow_pickle(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _malicious_pickle(ckpt, marker)
    with pytest.raises(ValueError, match=r"holds only pickle weights.*allow_pickle"):
        load_checkpoint(skeleton(), ckpt)
    with pytest.raises(ValueError, match=r"holds only pickle weights"):
        from_pretrained(ckpt, model_fn=Net)
    assert not marker.exists()


def test_malicious_pickle_is_not_executed_with_allow_pickle(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _malicious_pickle(ckpt, marker)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin could not be read with torch\.load\(weights_only=True\)"):
        load_checkpoint(skeleton(), ckpt, allow_pickle=True)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        from_pretrained(ckpt, model_fn=Net, allow_pickle=True)
    assert not marker.exists()
    # The payload is real: a plain unpickle would have run it.
    torch.load(ckpt / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "pwned"


REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("pwned")
raise SystemExit("modeling_x was imported")
"""


def _plant_remote_code(directory: Path, marker: Path, architecture: str) -> None:
    (directory / "modeling_x.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    (directory / "configuration_x.py").write_text(REMOTE_CODE.format(marker=str(marker)))

    def change(data: dict[str, Any]) -> None:
        data["architectures"] = [architecture]
        data["auto_map"] = {
            "AutoConfig": "configuration_x.XConfig",
            "AutoModel": "modeling_x.XModel",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM",
        }

    edit_config(directory, change)


def test_from_pretrained_never_imports_auto_map_code(ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    marker = tmp_path / "marker"
    edit_config(ckpt, lambda data: data.update(model_type="x"))
    _plant_remote_code(ckpt, marker, "XForCausalLM")
    with pytest.raises(ValueError, match=r"names architecture \['XForCausalLM'\].*never executed"):
        from_pretrained(ckpt)
    assert not marker.exists()
    assert "modeling_x" not in sys.modules and "configuration_x" not in sys.modules


def test_from_pretrained_loads_the_named_transformers_class_and_ignores_auto_map(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = transformers.LlamaForCausalLM(config)
    aqlm_ctx.load_tensors(model, random_tensors(model))
    directory = tmp_path / "llama"
    save_checkpoint(model, directory)
    marker = tmp_path / "marker"
    _plant_remote_code(directory, marker, "LlamaForCausalLM")
    loaded = from_pretrained(directory)
    assert type(loaded) is transformers.LlamaForCausalLM
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.codes, model.model.layers[0].self_attn.q_proj.codes)
    assert not marker.exists()
    assert "modeling_x" not in sys.modules and "configuration_x" not in sys.modules


def test_from_pretrained_on_a_checkpoint_of_your_own_model_asks_for_model_fn(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("architectures", None)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json names no architecture .*pass model_fn="):
        from_pretrained(ckpt)

"""aqlm-ctx inspect: the report, JSON output, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import aqlm_ctx.cli
from aqlm_ctx.cli import main
from aqlm_ctx.testing import random_tensors

from .hub import write_llama_checkpoint
from .test_loading import tiny_llama


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hub")
    write_llama_checkpoint(directory, tiny_llama(tie=False), (2, 8, 8), dtype=torch.float16, shards=2)
    return directory


def test_report(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "format:            2x8 g8" in out
    assert "quantized layers:  14" in out and "dense layers:      2" in out
    assert "in 2 file(s)" in out and "all patterns match modules of the architecture" in out


def test_json_report_and_unmatched_skip(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in checkpoint.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["linear_weights_not_to_quantize"].append("model.lm_haed.weight")
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(copy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skip_unmatched"] == ["model.lm_haed.weight"]
    assert report["quantized_layers"] == 14 and report["size_bytes"] > 0
    code_bits = 2 * 8 / 8
    assert report["bits_per_weight"] > code_bits


@pytest.mark.parametrize("make", ["missing", "empty", "no_block", "not_json"])
def test_not_a_checkpoint_is_one_line_error(tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "x"
    if make != "missing":
        target.mkdir()
    if make == "no_block":
        (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if make == "not_json":
        (target / "config.json").write_text("{")
    assert main(["inspect", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aqlm-ctx: error:") and err.count("\n") == 1


def test_module_entry_point(checkpoint: Path) -> None:
    env = {**os.environ, "AQ_USE_JIT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "aqlm_ctx", "inspect", str(checkpoint)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "quantized layers:  14" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "aqlm_ctx", "inspect", "/nonexistent"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2 and "not a readable AQLM checkpoint" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Malformed checkpoints: exit code 2 and exactly one line on stderr that names the tensor, file or field.

LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("single")
    write_llama_checkpoint(directory, tiny_llama(tie=False), (2, 8, 8), dtype=torch.float16)
    return directory


def rewrite(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def edit_json(file: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def run_inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, facts: tuple[str, ...]) -> None:
    assert code == 2
    assert err.startswith("aqlm-ctx: error:") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for fact in facts:
        assert fact in err, (fact, err)


def _layer(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    return lambda directory: rewrite(directory, change)


SINGLE_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "no-codebooks": (
        _layer(lambda t: t.pop(f"{LAYER}.codebooks")),
        (f"{LAYER} has codes and scales but no {LAYER}.codebooks", "needs codes, codebooks and scales"),
    ),
    "no-codes": (_layer(lambda t: t.pop(f"{LAYER}.codes")), (f"but no {LAYER}.codes",)),
    "codes-2d": (
        _layer(lambda t: t.update({f"{LAYER}.codes": t[f"{LAYER}.codes"][..., 0].contiguous()})),
        (f"{LAYER}.codes: shape [128, 8]", "expected [out_groups, in_groups, 2]", "2x8 g8"),
    ),
    "codes-int16": (
        _layer(lambda t: t.update({f"{LAYER}.codes": t[f"{LAYER}.codes"].to(torch.int16)})),
        (f"{LAYER}.codes: codes are torch.int16", "nbits_per_codebook=8 needs torch.int8"),
    ),
    "codebooks-shape": (
        _layer(lambda t: t.update({f"{LAYER}.codebooks": torch.zeros(2, 256, 1, 4, dtype=torch.float16)})),
        (f"{LAYER}.codebooks: shape [2, 256, 1, 4]", "expected [2, 256, 1, 8]"),
    ),
    "scales-shape": (
        _layer(lambda t: t.update({f"{LAYER}.scales": torch.ones(128, dtype=torch.float16)})),
        (f"{LAYER}.scales: shape [128]", "expected [128, 1, 1, 1]"),
    ),
    "scales-int": (
        _layer(lambda t: t.update({f"{LAYER}.scales": torch.ones(128, 1, 1, 1, dtype=torch.int32)})),
        (f"{LAYER}.scales: dtype torch.int32", "floating"),
    ),
    "gptq": (
        lambda d: edit_json(
            d / "config.json",
            lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4, "desc_act": False}),
        ),
        ("config.json", "quantized with quant_method 'gptq', not AQLM"),
    ),
    "field-type": (
        lambda d: edit_json(d / "config.json", lambda c: c["quantization_config"].update(nbits_per_codebook="8")),
        ("config.json: quantization_config: AqlmConfig.nbits_per_codebook must be an int in 1..16, got '8'",),
    ),
    "architectures": (
        lambda d: edit_json(d / "config.json", lambda c: c.update(architectures="LlamaForCausalLM")),
        ("config.json: 'architectures' must be a list of class names",),
    ),
    # What from_pretrained would refuse, found against the architecture's skeleton:
    "zero-rows": (
        _layer(
            lambda t: t.update(
                {f"{LAYER}.codes": t[f"{LAYER}.codes"][:0].contiguous(), f"{LAYER}.scales": t[f"{LAYER}.scales"][:0]}
            )
        ),
        ("cannot load", f"{LAYER}.codes: shape [0, 8, 2] in the checkpoint, the model expects [128, 8, 2]"),
    ),
    "skip-contradicts-codes": (
        lambda d: edit_json(
            d / "config.json", lambda c: c["quantization_config"]["linear_weights_not_to_quantize"].append("mlp")
        ),
        ("missing from the checkpoint:", "model.layers.0.mlp.gate_proj.weight"),
    ),
    "all-dense": (
        _layer(lambda t: [t.pop(name) for name in [n for n in t if n.endswith((".codes", ".codebooks", ".scales"))]]),
        ("holds no quantized layer (no .codes tensors), although its config is AQLM",),
    ),
    "no-quant-method": (
        lambda d: edit_json(d / "config.json", lambda c: c["quantization_config"].pop("quant_method")),
        ("has no AQLM quantization config", "found a 'quantization_config' block without quant_method"),
    ),
    "deep-json": (
        lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000),
        ("config.json is not valid JSON",),
    ),
}


@pytest.mark.parametrize("case", list(SINGLE_CASES))
def test_malformed_checkpoint_is_one_line_error(
    single: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(single, tmp_path / "ckpt"))
    corrupt, facts = SINGLE_CASES[case]
    corrupt(copy)
    assert_one_line_error(*run_inspect(capsys, str(copy))[::2], facts)


LAST = "model.layers.1.mlp.down_proj"  # in the second of two shards


def _move_to_first_shard(index: dict[str, Any]) -> None:
    weight_map = index["weight_map"]
    weight_map[f"{LAST}.codebooks"] = "model-00001-of-00002.safetensors"


SHARD_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "wrong-shard": (
        _move_to_first_shard,
        (
            "model.safetensors.index.json maps tensor",
            f"{LAST}.codebooks to model-00001-of-00002.safetensors, which does not hold it",
            "it is in model-00002-of-00002.safetensors",
        ),
    ),
    "extra-name": (
        lambda index: index["weight_map"].update({"model.extra.weight": "model-00001-of-00002.safetensors"}),
        ("maps tensor model.extra.weight to model-00001-of-00002.safetensors", "no shard the index lists holds it"),
    ),
    "unlisted": (  # not read (a warning), so the layer lacks its codebooks
        lambda index: index["weight_map"].pop(f"{LAST}.codebooks"),
        ("has codes and scales but no", f"{LAST}.codebooks"),
    ),
    "missing-shard": (
        lambda index: index["weight_map"].update({f"{LAST}.codes": "model-00009.safetensors"}),
        ("lists shard files that do not exist: model-00009.safetensors", f"{LAST}.codes"),
    ),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_shard_index_is_one_line_error(
    checkpoint: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    assert index["weight_map"][f"{LAST}.codebooks"] == "model-00002-of-00002.safetensors"  # the cases' premise
    change, facts = SHARD_CASES[case]
    edit_json(copy / "model.safetensors.index.json", change)
    assert_one_line_error(*run_inspect(capsys, str(copy))[::2], facts)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_file_inside_a_checkpoint_stands_for_its_directory(
    single: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_inspect(capsys, str(single / name))
    assert code == 0
    assert f"checkpoint:        {single}\n" in out and "quantized layers:  14" in out


def test_a_file_outside_a_checkpoint_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run_inspect(capsys, str(tmp_path / "notes.txt"))
    assert_one_line_error(code, err, ("notes.txt is a file", f"{tmp_path} holds no config.json"))


def test_pickle_only_needs_allow_pickle(single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = Path(shutil.copytree(single, tmp_path / "ckpt"))
    torch.save(load_file(copy / "model.safetensors"), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    code, _, err = run_inspect(capsys, str(copy))
    assert_one_line_error(code, err, ("holds only pickle weights (pytorch_model.bin)", "pass --allow-pickle"))
    assert "allow_pickle=True" not in err
    code, out, _ = run_inspect(capsys, str(copy), "--allow-pickle")
    assert code == 0 and "quantized layers:  14" in out and "pytorch_model.bin" not in out.split("in 1 file")[0]


def test_programming_errors_are_not_swallowed(single: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> tuple[int, int]:
        raise KeyError("a bug, not a bad checkpoint")

    monkeypatch.setattr(aqlm_ctx.cli, "_layer_bits", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["inspect", str(single)])


def test_module_entry_point_malformed_checkpoint_has_no_traceback(single: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(single, tmp_path / "ckpt"))
    rewrite(copy, lambda t: t.pop(f"{LAYER}.codebooks"))
    env = {**os.environ, "AQ_USE_JIT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "aqlm_ctx", "inspect", str(copy)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{LAYER}.codebooks" in result.stderr


def test_a_checkpoint_of_one_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """save_checkpoint(layer) writes codes / codebooks / scales at the root; inspect reads them as one layer."""
    with aqlm_ctx.aqlm_quantized(aqlm_ctx.AqlmConfig(num_codebooks=2, nbits_per_codebook=8)):
        layer = torch.nn.Linear(64, 32)
    aqlm_ctx.load_tensors(layer, random_tensors(layer))
    aqlm_ctx.save_checkpoint(layer, tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_layers"] == 1


def test_output_piped_to_a_reader_that_leaves_early_is_no_error(checkpoint: Path) -> None:
    """``aqlm-ctx inspect ... | head -1``: the rest of the report goes nowhere, quietly, with exit status 0."""
    command = [sys.executable, "-m", "aqlm_ctx", "inspect", "--json", str(checkpoint)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.readline()
        process.stdout.close()
        err = process.stderr.read().decode()
    assert process.returncode == 0 and "Traceback" not in err, err


def test_a_path_with_a_newline_stays_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_inspect(capsys, str(tmp_path / "new\nline"))
    assert_one_line_error(code, err, ("'", "new\\nline"))


def test_tensors_the_architecture_has_no_place_for_are_reported(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What from_pretrained(strict=False) ignores (rotary inv_freq saved by older transformers) is listed, exit 0."""
    copy = Path(shutil.copytree(single, tmp_path / "ckpt"))
    rewrite(copy, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    code, out, _ = run_inspect(capsys, str(copy))
    assert code == 0 and "unexpected:        1 tensor(s)" in out and "rotary_emb.inv_freq" in out
    assert aqlm_ctx.cli.inspect_checkpoint(copy)["unexpected_tensors"] == [
        "model.layers.0.self_attn.rotary_emb.inv_freq"
    ]

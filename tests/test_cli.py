"""aqlm-ctx inspect: the report, JSON output, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqlm_ctx.cli import main

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

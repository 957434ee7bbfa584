"""``aqlm-ctx inspect PATH``: what an AQLM checkpoint holds, read from its config and tensor headers only."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import TensorReader, find_checkpoint_files, open_checkpoint, pickle_only
from .config import AqlmConfig, read_checkpoint_config
from .loading import check_checkpoint
from .matching import SkipMatcher
from .substitutions import renamed_skip

__all__ = ["inspect_checkpoint", "main"]

_FLOAT_BITS = {"torch.float16": 16, "torch.bfloat16": 16, "torch.float32": 32, "torch.float64": 64}


def _module_paths_from_names(names: list[str]) -> nn.Module:
    """A stand-in module tree whose paths are every prefix of the tensor names (for matching skip patterns)."""
    root = nn.Module()
    for name in names:
        node = root
        for part in name.split(".")[:-1]:
            # Straight into _modules: any name a tensor may have ("", "training") is a path here, not an attribute.
            node = node._modules.setdefault(part, nn.Module())  # type: ignore[assignment]
    return root


def _checkpoint_directory(path: Path) -> Path:
    """The directory ``path`` names: itself, or the checkpoint directory of a file in it (config.json, a shard)."""
    if not path.is_file():
        return path
    if not (path.parent / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is a file, and its directory {path.parent} holds no config.json: expected an AQLM checkpoint "
            "directory or a file inside one"
        )
    return path.parent


def _parse_config(file: Path, block: dict[str, Any]) -> AqlmConfig:
    """The checkpoint's config; a bad field is a ValueError that names the file."""
    try:
        return AqlmConfig.from_dict(block)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: quantization_config: {error}") from error


def _architecture(file: Path, model_config: dict[str, Any]) -> str:
    """The first class name in the config's ``architectures`` list, or "unknown" where it has none."""
    names = model_config.get("architectures")
    if names is None or names == []:
        return "unknown"
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{file}: 'architectures' must be a list of class names, got {names!r}")
    return names[0]


_LAYER_PARTS = ("codes", "codebooks", "scales")


def _name(module: str, part: str) -> str:
    """The checkpoint name of a tensor of ``module`` (``""`` for a checkpoint of one layer)."""
    return f"{module}.{part}" if module else part


def _check_parts_present(names: set[str]) -> list[str]:
    """The quantized layers' module paths (those with codes or codebooks), checked to have all three parts."""
    modules = sorted({name.rpartition(".")[0] for name in names if name.rpartition(".")[2] in _LAYER_PARTS[:2]})
    for module in modules:
        have = [part for part in _LAYER_PARTS if _name(module, part) in names]
        if len(have) < len(_LAYER_PARTS):
            lacking = [_name(module, part) for part in _LAYER_PARTS if part not in have]
            raise ValueError(
                f"quantized layer {module or '<root>'} has {' and '.join(have)} but no {' or '.join(lacking)}; "
                "an AQLM layer needs codes, codebooks and scales"
            )
    return modules


def _layer_bits(reader: TensorReader, module: str, config: AqlmConfig) -> tuple[int, int]:
    """Bits on disk and weights of the quantized layer ``module``, after checking its tensors against ``config``."""
    parts = {part: reader.dtype_and_shape(_name(module, part)) for part in _LAYER_PARTS}
    codes_dtype, codes_shape = parts["codes"]
    if len(codes_shape) != 3 or codes_shape[2] != config.num_codebooks:
        raise ValueError(
            f"{_name(module, 'codes')}: shape {list(codes_shape)} in the checkpoint, expected [out_groups, in_groups, "
            f"{config.num_codebooks}] for the checkpoint's {config.format_name} config"
        )
    if codes_dtype != config.code_dtype:
        raise ValueError(
            f"{_name(module, 'codes')}: codes are {codes_dtype} in the checkpoint, but nbits_per_codebook="
            f"{config.nbits_per_codebook} needs {config.code_dtype}"
        )
    out_groups, in_groups, _ = codes_shape
    group = (config.out_group_size, config.in_group_size)
    expected = {"codebooks": (config.num_codebooks, config.codebook_size, *group), "scales": (out_groups, 1, 1, 1)}
    for part, shape in expected.items():
        dtype, stored = parts[part]
        if stored != shape:
            raise ValueError(
                f"{_name(module, part)}: shape {list(stored)} in the checkpoint, expected {list(shape)} for "
                f"{config.format_name} codes of shape {list(codes_shape)}"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"{_name(module, part)}: dtype {dtype} in the checkpoint, expected a floating dtype")
    bits = sum(_FLOAT_BITS.get(str(dtype), dtype.itemsize * 8) * math.prod(shape) for dtype, shape in parts.values())
    return bits, out_groups * in_groups * group[0] * group[1]


def _skeleton(path: Path, model_config: dict[str, Any], config: AqlmConfig, allow_pickle: bool) -> nn.Module | None:
    """The architecture's skeleton on meta as from_pretrained builds it, if transformers exports the class the
    config names."""
    from .loading import _build_transformers_model, _quantize_stored_linear_subclasses

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _build_transformers_model(path, model_config, config, dtype=torch.float16)
            _quantize_stored_linear_subclasses(model, path, config, allow_pickle)
            return model
    except Exception:
        return None


def _dense_layers(reader: TensorReader, names: list[str]) -> list[str]:
    """Module paths of the tensors named ``weight`` with two or more dimensions."""
    dense = []
    for name in names:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(reader.dtype_and_shape(name)[1]) >= 2:
            dense.append(module)
    return dense


def inspect_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Describe an AQLM checkpoint without loading its tensors.

    Args:
        path: the checkpoint directory, or a file inside it (``config.json``, a weight file): its directory is read.
        allow_pickle: read ``pytorch_model.bin`` weights (with ``torch.load(weights_only=True)``) if no safetensors.

    Returns:
        A dict with the config, layer counts, bits per weight, on-disk size and the skip patterns that match no
        module of the architecture.

    Raises:
        FileNotFoundError, ValueError: ``path`` is not a readable AQLM checkpoint, or a quantized layer's tensors
            are missing or do not fit its config (the message names the tensor).
    """
    directory = _checkpoint_directory(Path(path))
    model_config, block = read_checkpoint_config(directory)
    config = _parse_config(directory / "config.json", block)
    architecture = _architecture(directory / "config.json", model_config)
    files = find_checkpoint_files(directory, allow_pickle=allow_pickle)
    if not files.files:
        raise ValueError(f"{directory} lists no weight files")
    skeleton = _skeleton(directory, model_config, config, allow_pickle)
    code_bits = weights = 0
    with open_checkpoint(files) as reader:
        names = reader.names()
        name_set = set(names)
        quantized = _check_parts_present(name_set)
        if not quantized:
            raise ValueError(f"{directory} holds no quantized layer (no .codes tensors), although its config is AQLM")
        for module in quantized:
            bits, count = _layer_bits(reader, module, config)
            code_bits, weights = code_bits + bits, weights + count
        dense = [module for module in _dense_layers(reader, names) if _name(module, "codes") not in name_set]
        unexpected: list[str] = []
        if skeleton is not None:  # what from_pretrained refuses: missing or mismatched tensors
            _, unexpected = check_checkpoint(skeleton, reader, str(directory), config, strict=False)
    matcher = SkipMatcher(renamed_skip(config.skip, skeleton) if skeleton is not None else config.skip)
    found = matcher.resolve(skeleton if skeleton is not None else _module_paths_from_names(names))
    unmatched = [p for index, p in enumerate(config.skip) if index not in found.used]
    return {
        "path": str(directory),
        "architecture": architecture,
        "format": config.format_name,
        "quantization_config": {k: v for k, v in block.items() if k not in ("linear_weights_not_to_quantize",)},
        "quantized_layers": len(quantized),
        "dense_layers": len(dense),
        "dense_layer_names": dense,
        "bits_per_weight": code_bits / weights if weights else 0.0,
        "size_bytes": files.size_bytes,
        "files": [file.name for file in files.files],
        "skip": list(config.skip),
        "skip_checked_against": "architecture" if skeleton is not None else "tensor names",
        "skip_unmatched": unmatched,
        "unexpected_tensors": unexpected,
    }


def _print_report(report: dict[str, Any]) -> None:
    skip = report["skip"]
    lines = [
        f"checkpoint:        {report['path']}",
        f"architecture:      {report['architecture']}",
        f"format:            {report['format']}  {json.dumps(report['quantization_config'], default=str)}",
        f"quantized layers:  {report['quantized_layers']}",
        f"dense layers:      {report['dense_layers']}  ({', '.join(report['dense_layer_names'][:4])}"
        f"{', ...' if len(report['dense_layer_names']) > 4 else ''})",
        f"bits per weight:   {report['bits_per_weight']:.3f} (codes, codebooks and scales of quantized layers)",
        f"on disk:           {report['size_bytes'] / 2**20:.1f} MiB in {len(report['files'])} file(s)",
        f"skip list:         {len(skip)} pattern(s): {', '.join(skip[:4])}{', ...' if len(skip) > 4 else ''}",
    ]
    unmatched = report["skip_unmatched"]
    checked = report["skip_checked_against"]
    lines.append(
        f"skip matches:      all patterns match modules of the {checked}"
        if not unmatched
        else f"skip matches:      {len(unmatched)} pattern(s) match no module of the {checked}: {', '.join(unmatched)}"
    )
    unexpected = report["unexpected_tensors"]
    if unexpected:  # from_pretrained(strict=False) ignores them; strict loading refuses them
        listed = ", ".join(unexpected[:4]) + (", ..." if len(unexpected) > 4 else "")
        lines.append(f"unexpected:        {len(unexpected)} tensor(s) the architecture has no place for: {listed}")
    print("\n".join(lines))


def _inspect_for_cli(path: str, allow_pickle: bool) -> dict[str, Any]:
    """:func:`inspect_checkpoint`, refusing pickle weights with the command's own option in the message."""
    directory = _checkpoint_directory(Path(path))
    pickled = None if allow_pickle else pickle_only(directory)
    if pickled is not None:
        raise ValueError(
            f"{directory} holds only pickle weights ({pickled}); unpickling can run arbitrary code, so it is refused: "
            "pass --allow-pickle to read it with torch.load(weights_only=True), or convert it to safetensors"
        )
    return inspect_checkpoint(directory, allow_pickle=allow_pickle)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aqlm-ctx`` command and ``python -m aqlm_ctx``.

    Returns:
        0, or 2 after one line on stderr when the path is not a readable AQLM checkpoint.
    """
    parser = argparse.ArgumentParser(prog="aqlm-ctx", description="Tools for AQLM checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe an AQLM checkpoint directory")
    inspect.add_argument(
        "path",
        help="checkpoint directory (config.json + safetensors); a file inside one (config.json, a shard) stands "
        "for its directory",
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin weights when there are no safetensors (with torch.load(weights_only=True))",
    )
    args = parser.parse_args(argv)
    try:
        report = _inspect_for_cli(args.path, args.allow_pickle)
    except (OSError, ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        first_line = " ".join(lines[:3]) if lines[0].endswith(":") else lines[0]  # a heading: with its first items
        print(f"aqlm-ctx: error: {args.path!r} is not a readable AQLM checkpoint: {first_line}", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_report(report)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (| head): stop quietly, also at the exit-time flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

"""``aqlm-ctx inspect PATH``: what an AQLM checkpoint holds, read from its config and tensor headers only."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import find_checkpoint_files, open_checkpoint
from .config import AqlmConfig, read_checkpoint_config
from .matching import SkipMatcher

__all__ = ["inspect_checkpoint", "main"]

_FLOAT_BITS = {"torch.float16": 16, "torch.bfloat16": 16, "torch.float32": 32, "torch.float64": 64}


def _module_paths_from_names(names: list[str]) -> nn.Module:
    """A stand-in module tree whose paths are every prefix of the tensor names (for matching skip patterns)."""
    root = nn.Module()
    for name in names:
        node = root
        for part in name.split(".")[:-1]:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]  # type: ignore[assignment]
    return root


def _skeleton(path: Path, model_config: dict[str, Any], config: AqlmConfig) -> nn.Module | None:
    """The architecture's skeleton on meta, if transformers exports the class the config names."""
    from .loading import _build_transformers_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _build_transformers_model(path, model_config, config, dtype=torch.float16)
    except Exception:
        return None


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Describe an AQLM checkpoint without loading its tensors.

    Returns:
        A dict with the config, layer counts, bits per weight, on-disk size and the skip patterns that match no
        module of the architecture.

    Raises:
        FileNotFoundError, ValueError: ``path`` is not a readable AQLM checkpoint.
    """
    directory = Path(path)
    model_config, block = read_checkpoint_config(directory)
    config = AqlmConfig.from_dict(block)
    files = find_checkpoint_files(directory)
    quantized: list[str] = []
    dense: list[str] = []
    code_bits = weights = 0
    with open_checkpoint(files) as reader:
        names = reader.names()
        name_set = set(names)
        for name in names:
            module, _, leaf = name.rpartition(".")
            shape = reader.dtype_and_shape(name)[1]
            if leaf == "codes":
                quantized.append(module)
                _, books_shape = reader.dtype_and_shape(f"{module}.codebooks")
                out_groups, in_groups, _ = shape
                weights += out_groups * books_shape[2] * in_groups * books_shape[3]
                for part in ("codes", "codebooks", "scales"):
                    part_dtype, part_shape = reader.dtype_and_shape(f"{module}.{part}")
                    bits = _FLOAT_BITS.get(str(part_dtype), part_dtype.itemsize * 8)
                    code_bits += bits * math.prod(part_shape)
            elif leaf == "weight" and len(shape) >= 2 and f"{module}.codes" not in name_set:
                dense.append(module)
    skeleton = _skeleton(directory, model_config, config)
    matcher = SkipMatcher(config.skip)
    found = matcher.resolve(skeleton if skeleton is not None else _module_paths_from_names(names))
    unmatched = [p for index, p in enumerate(config.skip) if index not in found.used]
    return {
        "path": str(directory),
        "architecture": (model_config.get("architectures") or ["unknown"])[0],
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
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aqlm-ctx`` command and ``python -m aqlm_ctx``."""
    parser = argparse.ArgumentParser(prog="aqlm-ctx", description="Tools for AQLM checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe an AQLM checkpoint directory")
    inspect.add_argument("path", help="checkpoint directory (config.json + safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = inspect_checkpoint(args.path)
    except (FileNotFoundError, ValueError, TypeError) as error:
        first_line = str(error).splitlines()[0]
        print(f"aqlm-ctx: error: {args.path} is not a readable AQLM checkpoint: {first_line}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)
    return 0

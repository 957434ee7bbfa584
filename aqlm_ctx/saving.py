"""Writing models with ``aqlm.QuantizedLinear`` layers as HF-format AQLM checkpoints."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from aqlm import QuantizedLinear
from torch import nn

from .checkpoint import write_safetensors, write_text_atomically
from .config import AqlmConfig

__all__ = ["save_checkpoint"]

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must be a positive byte count or a size such as '5GB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _model_format(model: nn.Module) -> AqlmConfig:
    formats = {
        (layer.in_group_size, layer.out_group_size, layer.num_codebooks, layer.nbits_per_codebook)
        for layer in model.modules()
        if isinstance(layer, QuantizedLinear)
    }
    if len(formats) != 1:
        found = "no QuantizedLinear layers" if not formats else f"several formats {sorted(formats)}"
        raise ValueError(f"save_checkpoint needs a model whose quantized layers share one format; it has {found}")
    return AqlmConfig(*formats.pop())


def _checkpoint_codes(layer: QuantizedLinear) -> torch.Tensor:
    """Codes in the checkpoint layout, undoing the in-place permutation aqlm's CPU kernel makes on first use."""
    expected = (
        layer.out_features // layer.out_group_size,
        layer.in_features // layer.in_group_size,
        layer.num_codebooks,
    )
    codes = layer.codes.data
    if tuple(codes.shape) != expected and tuple(codes.shape) == (expected[1], expected[0], expected[2]):
        codes = codes.permute(1, 0, 2)
    return codes.contiguous()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = {id(layer.codes): layer for layer in model.modules() if isinstance(layer, QuantizedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied parameter is stored once, under its first name
            continue
        seen.add(id(tensor))
        tensors[name] = _checkpoint_codes(layers[id(tensor)]) if id(tensor) in layers else tensor.data
    on_meta = [name for name, tensor in tensors.items() if tensor.device.type == "meta"]
    if on_meta:
        raise ValueError(
            "cannot save tensors that are on the meta device (load or encode the model first): "
            + ", ".join(on_meta[:10])
        )
    return tensors


def _dense_weights(model: nn.Module) -> list[str]:
    names = []
    for path, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) and isinstance(module._parameters.get("weight"), torch.Tensor):
            names.append(f"{path}.weight" if path else "weight")
    return names


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    model_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``model`` as an HF-format AQLM checkpoint that :func:`aqlm_ctx.from_pretrained` and transformers read.

    Writes ``config.json`` (the transformers config for transformers models, else ``model_config``, with a
    ``quantization_config`` block whose ``linear_weights_not_to_quantize`` lists every dense weight) and the tensors
    as ``model.safetensors`` or, above ``max_shard_size``, as shards with ``model.safetensors.index.json``. Tied
    parameters are stored once; codes are stored in the checkpoint layout even after CPU inference with aqlm's own
    kernels. A save followed by a load is bit-exact.

    Args:
        model: a model with real (not meta) tensors whose QuantizedLinear layers share one format.
        path: the directory to write (created if needed).
        max_shard_size: bytes per shard, as an int or a string such as ``"5GB"`` or ``"500MiB"``.
        model_config: config entries for models that are not transformers models (e.g. your own hyper-parameters).
        overwrite: replace an existing checkpoint in ``path``; without it an existing one is an error.

    Returns:
        The files written.

    Raises:
        FileExistsError: ``path`` already holds a checkpoint and ``overwrite`` is false.
        ValueError: tensors are on meta, the quantized layers have several formats or none, bad ``max_shard_size``.
    """
    directory = Path(path)
    limit = _parse_size(max_shard_size)
    config = _model_format(model)
    tensors = _tensors(model)
    existing = [
        name
        for name in ("config.json", "model.safetensors", "model.safetensors.index.json")
        if (directory / name).exists()
    ]
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} already holds a checkpoint ({', '.join(existing)}); pass overwrite=True to replace it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / "model.safetensors.index.json"]:
        if overwrite and stale.exists():
            stale.unlink()
    codebooks = next(layer.codebooks for layer in model.modules() if isinstance(layer, QuantizedLinear))
    hf_config = getattr(model, "config", None)
    data: dict[str, Any] = dict(hf_config.to_dict()) if hf_config is not None and hasattr(hf_config, "to_dict") else {}
    if hf_config is not None and not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    data.update(model_config or {})
    data.pop("quantization_config", None)
    data["torch_dtype"] = str(codebooks.dtype).removeprefix("torch.")
    data["quantization_config"] = {
        "quant_method": "aqlm",
        "in_group_size": config.in_group_size,
        "out_group_size": config.out_group_size,
        "num_codebooks": config.num_codebooks,
        "nbits_per_codebook": config.nbits_per_codebook,
        "linear_weights_not_to_quantize": _dense_weights(model),
    }
    files = write_safetensors(directory, tensors, limit, {"format": "pt"})
    write_text_atomically(directory / "config.json", json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
        files.append(directory / "generation_config.json")
    return [*files, directory / "config.json"]

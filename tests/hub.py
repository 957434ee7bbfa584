"""Writes tiny checkpoints exactly in the hub's AQLM layout, independently of aqlm_ctx's own saver."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def encode_random(
    out_features: int, in_features: int, fmt: tuple[int, int, int], generator: torch.Generator, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random codes/codebooks/scales in the layout aqlm's converter writes (unsigned codes stored signed)."""
    num_codebooks, nbits, in_group = fmt
    codes = torch.randint(0, 2**nbits, (out_features, in_features // in_group, num_codebooks), generator=generator)
    codes = torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes)
    std = 1 / math.sqrt(in_features * num_codebooks)
    return {
        "codes": codes.to(torch.int8 if nbits <= 8 else torch.int16),
        "codebooks": (torch.randn(num_codebooks, 2**nbits, 1, in_group, generator=generator) * std).to(dtype),
        "scales": (1 + 0.1 * torch.rand(out_features, 1, 1, 1, generator=generator)).to(dtype),
    }


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: ``W[o, i*g+b] = scales[o] * sum_c codebooks[c, code mod 2**nbits, 0, b]``."""
    size = codebooks.shape[1]
    unsigned = codes.long() % size
    weight = sum(codebooks[c, unsigned[:, :, c], 0, :].double() for c in range(codebooks.shape[0]))
    weight = weight * scales.double().reshape(-1, 1, 1)
    return weight.reshape(codes.shape[0], -1)


def write_llama_checkpoint(
    directory: Path,
    dense: nn.Module,
    fmt: tuple[int, int, int],
    *,
    skip_form: str = "weight",
    dtype: torch.dtype = torch.float16,
    shards: int = 1,
    seed: int = 0,
    legacy: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize ``dense`` (a transformers Llama) with random codes and write it as a hub AQLM checkpoint.

    Dense's linear weights are replaced in place by the dequantized codes, so ``dense`` becomes the oracle.
    Returns the tensors written.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    dense_names = []
    seen: set[int] = set()
    for name, module in dense.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(LINEAR_SUFFIXES):
            encoded = encode_random(module.out_features, module.in_features, fmt, generator, dtype)
            tensors.update({f"{name}.{key}": value for key, value in encoded.items()})
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(dtype)
            with torch.no_grad():
                module.weight.copy_(dequantize(**encoded))
            seen.add(id(module.weight))
    for name, param in dense.named_parameters():  # remove_duplicate: tied parameters are stored once
        if id(param) not in seen:
            with torch.no_grad():
                param.copy_(param.to(dtype))  # the oracle sees exactly the rounded values
            tensors[name] = param.detach().to(dtype).clone()
            dense_names.append(name)
    tied = [name for name, p in dense.named_parameters(remove_duplicate=False) if name not in dense_names]
    listed = dense_names + [name for name in tied if id(dense.get_parameter(name)) not in seen]
    skip = listed if skip_form == "weight" else [name.removesuffix(".weight") for name in listed]
    block: dict[str, Any] = {
        "in_group_size": fmt[2],
        "out_group_size": 1,
        "num_codebooks": fmt[0],
        "nbits_per_codebook": fmt[1],
        "linear_weights_not_to_quantize": skip,
    }
    config = dense.config.to_dict()
    config["architectures"] = [type(dense).__name__]
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if legacy:
        config["model_type"] = "llama_aqlm"
        config["aqlm"] = block
    else:
        config["quantization_config"] = {"quant_method": "aqlm", **block}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, default=str))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        per_shard = math.ceil(len(names) / shards)
        weight_map = {}
        for index in range(shards):
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[index * per_shard : (index + 1) * per_shard]}
            save_file(part, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index_data = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_data))
    return tensors

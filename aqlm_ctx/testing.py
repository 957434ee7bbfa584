"""Utilities for tests, examples and benchmarks: random but well-scaled AQLM tensors for any skeleton."""

from __future__ import annotations

import math
from typing import Any

import torch
from aqlm import QuantizedLinear
from torch import nn

__all__ = ["model_signature", "random_tensors"]


def random_tensors(model: nn.Module, seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint-style tensors for every parameter and persistent buffer of ``model`` (tied ones once).

    Quantized layers get uniformly random codes and codebooks scaled so that each dequantized weight has a standard
    deviation of about ``1/sqrt(in_features)``; dense 1-D weights are ones, biases zeros, other weights small
    Gaussians. Feed the result to :func:`aqlm_ctx.load_tensors` or save it as a checkpoint.

    Args:
        model: a skeleton (on meta or not).
        seed: makes the tensors reproducible.
        dtype: dtype of floating tensors; default: the dtype each tensor has in ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {id(layer.codes): layer for layer in model.modules() if isinstance(layer, QuantizedLinear)}
    codebook_owner = {id(layer.codebooks): layer for layer in layers.values()}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        float_dtype = dtype or (tensor.dtype if tensor.is_floating_point() else torch.float32)
        if id(tensor) in layers:
            nbits = layers[id(tensor)].nbits_per_codebook
            half = 2 ** (nbits - 1)
            value = torch.randint(-half, half, tuple(tensor.shape), generator=generator).to(tensor.dtype)
        elif id(tensor) in codebook_owner:
            layer = codebook_owner[id(tensor)]
            std = 1.0 / math.sqrt(layer.in_features * layer.num_codebooks)
            value = (torch.randn(tuple(tensor.shape), generator=generator) * std).to(float_dtype)
        elif not tensor.is_floating_point():
            value = torch.zeros(tuple(tensor.shape), dtype=tensor.dtype)
        elif name.endswith("scales"):
            value = (1 + 0.1 * torch.rand(tuple(tensor.shape), generator=generator)).to(float_dtype)
        elif name.endswith("bias"):
            value = torch.zeros(tuple(tensor.shape), dtype=float_dtype)
        elif tensor.dim() == 1:
            value = torch.ones(tuple(tensor.shape), dtype=float_dtype)
        else:
            value = (torch.randn(tuple(tensor.shape), generator=generator) * 0.02).to(float_dtype)
        tensors[name] = value
    return tensors


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What two builds of the same model must agree on: module paths and classes, parameters and buffers (names,
    shapes, dtypes, devices, ``requires_grad``) and which parameters are tied (the same object).

    Example:
        >>> assert model_signature(built_in_context) == model_signature(converted_by_visitor)  # doctest: +SKIP
    """
    modules = [(path, type(module).__name__) for path, module in model.named_modules(remove_duplicate=False)]
    params = [
        (name, tuple(p.shape), p.dtype, p.device.type, p.requires_grad)
        for name, p in model.named_parameters(remove_duplicate=False)
    ]
    buffers = [
        (name, tuple(b.shape), b.dtype, b.device.type) for name, b in model.named_buffers(remove_duplicate=False)
    ]
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    ties = sorted(sorted(names) for names in owners.values() if len(names) > 1)
    return {"modules": modules, "parameters": params, "buffers": buffers, "ties": ties}

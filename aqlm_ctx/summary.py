"""What a quantized model holds: layer counts, storage and bits per weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from aqlm import QuantizedLinear
from torch import nn

__all__ = ["ModelSummary", "summarize"]


@dataclass(frozen=True)
class ModelSummary:
    """Counts and sizes of a model whose linear layers may be ``aqlm.QuantizedLinear``.

    Sizes count floating tensors at ``float_bytes`` bytes per element (2 for fp16 storage), whatever device or
    dtype they have now, so a skeleton on meta reports what it will need once loaded.
    """

    quantized_layers: int
    dense_linear_layers: int
    parameters: int
    """Weights the model stands for: a quantized layer counts its in x out weights, not its codes."""
    quantized_weights: int
    """Weights stored as codes."""
    code_bits: int
    """Storage bits of the quantized layers' codes (at their int8/int16 width), codebooks and scales (``float_bytes``
    per value), bias excluded."""
    bytes: int
    """Storage of the whole model: codes, codebooks, scales and every other parameter and buffer."""
    dense_bytes: int
    """The same model with every layer dense, at ``float_bytes`` per weight."""

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per quantized weight, codebooks and scales included.

        The definition of :func:`aqlm_ctx.encoding.quantized_bits_per_weight` and ``aqlm-ctx inspect`` (for fp16
        storage): a 1x4 code counts 8 bits, the int8 it is stored in, not 4.
        """
        return self.code_bits / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def compression(self) -> float:
        """``dense_bytes / bytes``."""
        return self.dense_bytes / self.bytes if self.bytes else 0.0


def _storage(tensor: torch.Tensor, float_bytes: int) -> int:
    size = float_bytes if tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * size


def summarize(model: nn.Module, float_bytes: int = 2) -> ModelSummary:
    """Summarise ``model``; works on a skeleton on meta as well as on a loaded model.

    Args:
        model: any module.
        float_bytes: bytes per floating-point element when stored (2: fp16/bf16).

    Example:
        >>> summarize(model).bits_per_weight  # doctest: +SKIP
        2.03
    """
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    quantized_ids = {id(p) for layer in quantized for p in layer.parameters()}
    # Layers that share one weight (tied) share their codes: each weight counts once, as each tensor is stored once.
    weights = {id(layer.codes): layer for layer in quantized}.values()
    quantized_weights = sum(layer.in_features * layer.out_features for layer in weights)
    parts = {id(t): t for layer in quantized for t in (layer.codes, layer.codebooks, layer.scales)}
    code_bits = 8 * sum(_storage(t, float_bytes) for t in parts.values())
    others = [p for p in model.parameters() if id(p) not in quantized_ids]
    tensors = [*model.parameters(), *model.buffers()]
    stored = sum(_storage(t, float_bytes) for t in tensors)
    biases = sum(bias.numel() for bias in {id(m.bias): m.bias for m in quantized if m.bias is not None}.values())
    dense_bytes = (quantized_weights + biases) * float_bytes + sum(_storage(t, float_bytes) for t in others)
    dense_bytes += sum(_storage(b, float_bytes) for b in model.buffers())
    return ModelSummary(
        quantized_layers=len(quantized),
        dense_linear_layers=sum(isinstance(m, nn.Linear) for m in model.modules()),
        parameters=quantized_weights + biases + sum(p.numel() for p in others),
        quantized_weights=quantized_weights,
        code_bits=code_bits,
        bytes=stored,
        dense_bytes=dense_bytes,
    )

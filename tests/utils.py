"""Test helpers: model signatures for equivalence checks and an independent dense oracle."""

from __future__ import annotations

from typing import Any

import torch
from aqlm import QuantizedLinear
from torch import nn

from aqlm_ctx.testing import model_signature

signature = model_signature


def tiny_llama_config(**overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` small enough for CPU tests (one layer, hidden 64, vocab 128, untied)."""
    import transformers

    fields: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "tie_word_embeddings": False,
    }
    return transformers.LlamaConfig(**{**fields, **overrides})


def quantized_paths(model: nn.Module) -> set[str]:
    return {path for path, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def linear_paths(model: nn.Module) -> set[str]:
    return {path for path, module in model.named_modules() if type(module) is nn.Linear}


def dense_weight(layer: QuantizedLinear) -> torch.Tensor:
    """The layer's weight, dequantized with explicit loops over codebooks (independent of aqlm and aqlm_ctx)."""
    codes = layer.codes.long() % layer.codebook_size
    out_groups, in_groups, num_codebooks = codes.shape
    _, _, og, ig = layer.codebooks.shape
    weight = torch.zeros(out_groups, in_groups, og, ig, dtype=torch.float64)
    for c in range(num_codebooks):
        weight += layer.codebooks[c].double()[codes[:, :, c]]
    weight *= layer.scales.double()
    return weight.permute(0, 2, 1, 3).reshape(out_groups * og, in_groups * ig)


def fill_random_(layer: QuantizedLinear, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> None:
    """Materialise an empty QuantizedLinear on CPU with random codes, codebooks, scales and bias."""
    for name, param in list(layer.named_parameters(recurse=False)):
        if name == "codes":
            low, high = -(2 ** (layer.nbits_per_codebook - 1)), 2 ** (layer.nbits_per_codebook - 1)
            value = torch.randint(low, high, param.shape, generator=generator, dtype=torch.int64).to(param.dtype)
        elif name == "scales":
            value = torch.rand(param.shape, generator=generator, dtype=torch.float64).to(dtype) + 0.5
        else:
            value = (torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.1).to(dtype)
        setattr(layer, name, nn.Parameter(value, requires_grad=False))

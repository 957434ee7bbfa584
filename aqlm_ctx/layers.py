"""Making ``aqlm.QuantizedLinear`` layers and turning modules into them in place.

Conversions keep the module object itself (its identity, hooks, buffers, training flag and any attributes a
framework set on it) and swap its class and parameters, so every reference to a layer stays valid and the
context, the visitor and the decorator produce the same model.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from aqlm import QuantizedLinear
from torch import nn

from .config import AqlmConfig
from .kernels import install_kernels

__all__ = [
    "check_divisible",
    "layer_config",
    "make_all_quantized_in_place",
    "make_dense_in_place",
    "make_quantized_in_place",
    "new_quantized_linear",
    "original_linear_init",
    "strip_foreign_parameters",
]

original_linear_init = nn.Linear.__init__
"""``nn.Linear.__init__`` as torch defines it (captured at import, before any patch)."""

_MODULE_KEYS = frozenset(vars(nn.Module()))
_QUANTIZED_PARAMETERS = ("codebooks", "codes", "scales", "bias")


def _own_keys(module: nn.Module) -> frozenset[str]:
    return frozenset(vars(module)) - _MODULE_KEYS


_LINEAR_KEYS = _own_keys(nn.Linear(1, 1, device="meta"))
_QUANTIZED_KEYS = _own_keys(QuantizedLinear(1, 1, 1, 1, 1, 1, device="meta"))


def check_divisible(in_features: int, out_features: int, config: AqlmConfig, where: str) -> str | None:
    """A message if a ``Linear(in_features, out_features)`` cannot be stored in ``config``'s groups, else ``None``.

    Args:
        where: names the layer in the message (its path, or the source line that built it).
    """
    problems = []
    if in_features % config.in_group_size:
        problems.append(f"in_features={in_features} is not divisible by in_group_size={config.in_group_size}")
    if out_features % config.out_group_size:
        problems.append(f"out_features={out_features} is not divisible by out_group_size={config.out_group_size}")
    if not problems:
        return None
    return f"{where}: Linear({in_features}, {out_features}): {' and '.join(problems)}"


def indivisible_layers_error(problems: list[str], config: AqlmConfig, outcome: str = "") -> ValueError:
    """The error for layers that :func:`check_divisible` refused, listing each ``problems`` message.

    Args:
        outcome: appended to the advice, e.g. ``"; the model was not changed"``.
    """
    return ValueError(
        f"cannot quantize these layers with in_group_size={config.in_group_size}, "
        f"out_group_size={config.out_group_size}:\n  "
        + "\n  ".join(problems)
        + "\nadd them to skip=[...] to keep them dense"
        + outcome
    )


def layer_config(layer: QuantizedLinear) -> AqlmConfig:
    """The format a QuantizedLinear stores its weight in (its four format fields)."""
    return AqlmConfig(layer.in_group_size, layer.out_group_size, layer.num_codebooks, layer.nbits_per_codebook)


def new_quantized_linear(
    in_features: int, out_features: int, bias: bool, config: AqlmConfig, dtype: torch.dtype
) -> QuantizedLinear:
    """An empty ``QuantizedLinear`` on the meta device, in ``config.dtype`` or else ``dtype``, wired to our kernels."""
    layer = QuantizedLinear(
        in_features,
        out_features,
        in_group_size=config.in_group_size,
        out_group_size=config.out_group_size,
        num_codebooks=config.num_codebooks,
        nbits_per_codebook=config.nbits_per_codebook,
        bias=bias,
        device="meta",
        dtype=config.dtype or dtype,
    )
    install_kernels(layer)
    return layer


def _become(module: nn.Module, template: nn.Module, old_keys: frozenset[str]) -> None:
    """Give ``module`` the class, own attributes and parameters of ``template``; keep its generic module state."""
    state = {key: value for key, value in vars(module).items() if key not in old_keys}
    state.update((key, value) for key, value in vars(template).items() if key not in _MODULE_KEYS)
    state["_parameters"] = template._parameters
    hooked = state.get("_old_forward")  # accelerate's hooks call the forward the layer had when they were added
    if isinstance(hooked, types.MethodType) and hooked.__self__ is module and hooked.__func__ is type(module).forward:
        state["_old_forward"] = types.MethodType(type(template).forward, module)
    module.__dict__.clear()
    module.__dict__.update(state)
    module.__class__ = type(template)


def make_quantized_in_place(module: nn.Linear, template: QuantizedLinear) -> None:
    """Turn the ``nn.Linear`` ``module`` into ``template`` (a fresh QuantizedLinear); its weight is released."""
    _become(module, template, _LINEAR_KEYS)


def make_all_quantized_in_place(pairs: Iterable[tuple[nn.Module, QuantizedLinear]]) -> Callable[[], None]:
    """:func:`make_quantized_in_place` for every ``(module, template)``, all or nothing: on an error every module
    already turned is put back as it was. Returns a function that puts them all back (for a later step that fails)."""
    converted: list[tuple[nn.Module, type[nn.Module], dict[str, Any]]] = []

    def undo() -> None:
        for module, cls, state in reversed(converted):
            module.__dict__.clear()
            module.__dict__.update(state)
            module.__class__ = cls

    try:
        for module, template in pairs:
            converted.append((module, type(module), dict(vars(module))))
            make_quantized_in_place(module, template)  # type: ignore[arg-type]
    except BaseException:
        undo()
        raise
    return undo


def make_dense_in_place(
    module: QuantizedLinear,
    device: torch.device,
    dtype: torch.dtype,
    requires_grad: bool = True,
    keep_bias: bool = False,
) -> None:
    """Turn a QuantizedLinear back into an ``nn.Linear`` built on ``device`` in ``dtype``.

    A ``weight`` parameter assigned to the module meanwhile (a tied embedding) is kept, so ties survive, and so is
    its ``bias`` with ``keep_bias`` (one tied to another module); new parameters get ``requires_grad`` (``False``
    when model code froze the layer while it was quantized).
    """
    template = nn.Linear.__new__(nn.Linear)
    original_linear_init(
        template, module.in_features, module.out_features, module.bias is not None, device=device, dtype=dtype
    )
    template.requires_grad_(requires_grad)
    tied = module._parameters.get("weight")
    if tied is not None:
        template._parameters["weight"] = tied
    if keep_bias:
        template._parameters["bias"] = module._parameters.get("bias")
    _become(module, template, _QUANTIZED_KEYS)


def strip_foreign_parameters(module: QuantizedLinear) -> list[str]:
    """Drop parameters a QuantizedLinear does not have (a ``weight`` tied to it by model code); return their names."""
    foreign = [name for name in module._parameters if name not in _QUANTIZED_PARAMETERS]
    for name in foreign:
        del module._parameters[name]
    return foreign


def shared_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters that more than one module of ``model`` holds (tied parameters)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                (shared if id(parameter) in seen else seen).add(id(parameter))
    return shared

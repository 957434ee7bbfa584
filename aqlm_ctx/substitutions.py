"""Module substitutions: build a quantizable module in place of one that stores its weights in another form.

Some architectures keep weights that AQLM checkpoints quantize per layer in a fused form that no ``nn.Linear``
holds: transformers 5 stores Mixtral's and Qwen2-MoE's experts as two 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``), while AQLM checkpoints hold each expert's ``w1``/``w2``/``w3`` as separate quantized layers.

A :class:`Substitution` names the class to replace, how to build the replacement from the original module, and
how checkpoint tensor names map onto the replacement (regex renames). Inside :class:`aqlm_ctx.aqlm_quantized` the
replacement is swapped in the moment the original is attached to its parent (so the original's fused parameters
live only on meta), and :func:`aqlm_ctx.replace_linear_layers` swaps it in the same way; the replacement's own
``nn.Linear`` layers are then quantized under the usual skip rules. :func:`aqlm_ctx.load_checkpoint` applies the
renames of every module in the model that declares ``checkpoint_renames``.

Registered by default (when transformers has them): ``MixtralExperts`` (children ``w1``, ``w3``, ``w2``; renames
``.block_sparse_moe.`` to ``.mlp.``) and ``Qwen2MoeExperts`` (children ``gate_proj``, ``up_proj``, ``down_proj``).
Other fused-experts classes with the same layout can be registered with :func:`register_substitution` and
:func:`fused_experts_substitution`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "FusedExperts",
    "Substitution",
    "SwappedModules",
    "apply_renames",
    "checkpoint_renames",
    "fused_experts_substitution",
    "register_substitution",
    "substitution_for",
]


@dataclass(frozen=True)
class Substitution:
    """Replace modules of class ``target`` by ``build(original)``.

    Args:
        target: the exact class to replace (not its subclasses).
        build: makes the replacement from the original module, in the original's dtype; the replacement's
            linear layers must be plain ``nn.Linear`` (they are quantized like any other) and it must compute what
            the original computes.
        checkpoint_renames: ``(pattern, replacement)`` regexes mapping checkpoint tensor names to the model's, as
            ``re.sub`` applies them; they also rename skip patterns read from a checkpoint.
        fill: ``fill(original, replacement)`` gives the replacement's layers that stay dense (skipped) the
            original's real weights, for :func:`aqlm_ctx.replace_linear_layers` on a model with weights; without
            it such a conversion is refused.
    """

    target: type[nn.Module]
    build: Callable[[nn.Module], nn.Module]
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    fill: Callable[[nn.Module, nn.Module], None] | None = None


class FusedExperts(nn.Module):
    """Per-expert gated MLPs that compute exactly what transformers' fused experts compute.

    Expert ``e`` holds ``gate``, ``up`` and ``down`` linear layers under the names given (Mixtral: ``w1``, ``w3``,
    ``w2``), so ``gate_up_proj[e] == cat(gate.weight, up.weight)`` and ``down_proj[e] == down.weight``.

    Args:
        num_experts, hidden_size, intermediate_size: the experts' shape.
        act_fn: the activation applied to the gate projection.
        names: child names of the gate, up and down projections.
        checkpoint_renames: see :class:`Substitution`.
        dtype: of the layers (by default torch's default dtype).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        checkpoint_renames: tuple[tuple[str, str], ...] = (),
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        gate, up, down = names
        factory: dict[str, Any] = {"bias": False, "dtype": dtype}
        for index in range(num_experts):  # children "0", "1", ...: paths experts.<e>.<name> as in checkpoints
            expert = nn.ModuleDict(
                {
                    gate: nn.Linear(hidden_size, intermediate_size, **factory),
                    up: nn.Linear(hidden_size, intermediate_size, **factory),
                    down: nn.Linear(intermediate_size, hidden_size, **factory),
                }
            )
            self.add_module(str(index), expert)
        self.num_experts = num_experts
        self.names = names
        self.act_fn = act_fn
        self.checkpoint_renames = checkpoint_renames

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> nn.ModuleDict:
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert {index} out of range for {self.num_experts} experts")
        expert: nn.ModuleDict = self._modules[str(index)]  # type: ignore[assignment]
        return expert

    def __iter__(self) -> Iterator[nn.ModuleDict]:
        return (self[index] for index in range(self.num_experts))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_states [tokens, hidden]``, the router's ``top_k_index``/``top_k_weights [tokens, k]``."""
        gate, up, down = self.names
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == self.num_experts:  # transformers routes padding to a sentinel expert
                continue
            expert = self[index]
            top_k_pos, token_idx = torch.where(mask[index])
            state = hidden_states[token_idx]
            current = self.act_fn(expert[gate](state)) * expert[up](state)
            current = expert[down](current) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final


def fused_experts_substitution(
    target: type[nn.Module],
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    checkpoint_renames: Iterable[tuple[str, str]] = (),
) -> Substitution:
    """A :class:`Substitution` for a transformers fused-experts class (``gate_up_proj``/``down_proj``, [gate; up]).

    Example:
        >>> register_substitution(fused_experts_substitution(OlmoeExperts))  # doctest: +SKIP
    """
    renames = tuple(checkpoint_renames)

    def build(original: nn.Module) -> nn.Module:
        fused = getattr(original, "gate_up_proj", None)
        if not isinstance(fused, torch.Tensor) or fused.dim() != 3 or not hasattr(original, "act_fn"):
            raise TypeError(
                f"{type(original).__name__} does not have the fused-experts layout this substitution expects "
                "(a 3-D gate_up_proj [experts, 2 * intermediate, hidden], down_proj and act_fn)"
            )
        experts, two_intermediate, hidden = fused.shape
        act_fn: Callable[[torch.Tensor], torch.Tensor] = original.act_fn  # type: ignore[assignment]
        return FusedExperts(experts, hidden, two_intermediate // 2, act_fn, names, renames, fused.dtype)

    def fill(original: nn.Module, replacement: nn.Module) -> None:
        gate_up: torch.Tensor = original.gate_up_proj  # type: ignore[assignment]
        down_proj: torch.Tensor = original.down_proj  # type: ignore[assignment]
        gate, up, down = names
        for index in range(gate_up.shape[0]):
            gate_weight, up_weight = gate_up[index].chunk(2)  # [gate; up] along the intermediate dimension
            for name, weight in ((gate, gate_weight), (up, up_weight), (down, down_proj[index])):
                layer = replacement.get_submodule(f"{index}.{name}")
                if type(layer) is nn.Linear:  # kept dense by skip: the original's weight, not a meta stand-in
                    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=gate_up.requires_grad)

    return Substitution(target, build, renames, fill)


_REGISTRY: dict[type[nn.Module], Substitution] = {}
_LOCK = threading.Lock()
_MIXTRAL_RENAMES = ((r"\.block_sparse_moe\.", ".mlp."),)
# Known classes by (module, name): matched on the class of a module being built, so nothing is imported for them.
_DEFAULTS: dict[tuple[str, str], tuple[tuple[str, str, str], tuple[tuple[str, str], ...]]] = {
    ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"): (("w1", "w3", "w2"), _MIXTRAL_RENAMES),
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"): (
        ("gate_proj", "up_proj", "down_proj"),
        (),
    ),
}


def register_substitution(substitution: Substitution) -> None:
    """Register (or replace) the substitution for ``substitution.target``, for all later builds and visits."""
    if not isinstance(substitution, Substitution):
        raise TypeError(f"register_substitution takes a Substitution, got {type(substitution).__name__}")
    with _LOCK:
        _REGISTRY[substitution.target] = substitution


def substitution_for(module: nn.Module) -> Substitution | None:
    """The substitution registered for exactly ``type(module)`` (or known for it by default), if any."""
    cls = type(module)
    found = _REGISTRY.get(cls)
    if found is None:
        default = _DEFAULTS.get((cls.__module__, cls.__name__))
        if default is not None:
            with _LOCK:
                found = _REGISTRY.setdefault(cls, fused_experts_substitution(cls, *default))
    return found


def checkpoint_renames(model: nn.Module) -> list[tuple[str, str]]:
    """The ``checkpoint_renames`` that modules of ``model`` declare, each once, in model order."""
    renames: list[tuple[str, str]] = []
    for module in model.modules():
        for rename in getattr(module, "checkpoint_renames", ()):
            if rename not in renames:
                renames.append(rename)
    return renames


def apply_renames(name: str, renames: Iterable[tuple[str, str]]) -> str:
    """``name`` with every ``(pattern, replacement)`` applied in turn with :func:`re.sub`."""
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


def renamed_skip(skip: tuple[Any, ...], model: nn.Module) -> tuple[Any, ...]:
    """A checkpoint's skip patterns with ``model``'s :func:`checkpoint_renames` applied to its names (hub lists name
    checkpoint tensors, e.g. Mixtral's ``block_sparse_moe``); ``re:`` patterns and callables as they are."""
    renames = checkpoint_renames(model)
    return tuple(apply_renames(p, renames) if isinstance(p, str) and not p.startswith("re:") else p for p in skip)


def _has_real_tensors(module: nn.Module) -> bool:
    return any(not tensor.is_meta for tensor in [*module.parameters(), *module.buffers()])


@dataclass(frozen=True)
class Swapped:
    """One swap made in an existing model: ``parent._modules[name]`` was ``original`` and is ``replacement``."""

    parent: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module


class SwappedModules:
    """The registered substitutions swapped into an existing model, replacements built on meta, until undone.

    Used by :func:`aqlm_ctx.replace_linear_layers` and :func:`aqlm_ctx.quantize_weights_`: swap in, then check
    (:meth:`unfillable`), fill and convert, and on any failure :meth:`undo`.

    Example:
        >>> swaps = SwappedModules(model)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module) -> None:
        replacements: dict[int, nn.Module] = {}
        self.swaps: list[Swapped] = []
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                substitution = substitution_for(child) if child is not None else None
                if substitution is None or child is None:
                    continue
                if id(child) not in replacements:
                    with torch.device("meta"):
                        replacements[id(child)] = substitution.build(child)
                parent._modules[name] = replacements[id(child)]
                self.swaps.append(Swapped(parent, name, child, replacements[id(child)]))

    def unique(self) -> list[Swapped]:
        """Each swap once (a module shared by two parents was replaced once)."""
        by_original = {id(swap.original): swap for swap in reversed(self.swaps)}  # the first swap of each
        return [swap for swap in self.swaps if by_original[id(swap.original)] is swap]

    def unfillable(self, model: nn.Module, prefix: str, needs_weights: Callable[[nn.Module], bool]) -> list[str]:
        """``"Class at path"`` for each swapped module that has real weights, whose substitution has no ``fill`` and
        whose replacement ``needs_weights``."""
        paths = {id(module): path for path, module in model.named_modules()}
        found = []
        for swap in self.unique():
            if not _has_real_tensors(swap.original) or not needs_weights(swap.replacement):
                continue
            if substitution_for(swap.original).fill is None:  # type: ignore[union-attr]
                path = ".".join(part for part in (prefix, paths.get(id(swap.replacement), "?")) if part)
                found.append(f"{type(swap.original).__name__} at {path or '<root>'}")
        return found

    def fill(self) -> None:
        """Give each replacement the original's real weights where its substitution can (``fill``)."""
        for swap in self.unique():
            fill = substitution_for(swap.original).fill  # type: ignore[union-attr]
            if fill is not None and _has_real_tensors(swap.original):
                fill(swap.original, swap.replacement)

    def undo(self) -> None:
        """Put every original back."""
        for swap in self.swaps:
            swap.parent._modules[swap.name] = swap.original

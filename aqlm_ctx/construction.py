"""``aqlm_quantized``: build models whose linear layers come out as ``aqlm.QuantizedLinear`` on the meta device.

How it works, and why it is safe inside someone else's program:

* ``nn.Linear.__init__`` is wrapped through the class itself (so ``from torch.nn import Linear`` done earlier is
  caught too) while at least one block is open anywhere; the wrapper acts only for exactly ``nn.Linear`` and only
  when the calling thread or asyncio task has a block open (a :class:`contextvars.ContextVar`); everyone else gets
  the original. When the last block closes, the original function object is put back (``vars(nn.Linear)`` holds
  the very same objects as before).
* Other tensors built inside the block go to the meta device through a ``TorchFunctionMode`` that each block
  pushes on its thread's stack and that, like ``torch.device("meta")``, fills in ``device`` only where the caller
  passed none, and only for the context (thread or task) that opened the block, while the block is open.
* Module paths do not exist while a layer is built, so skip patterns are applied when the block ends: the block
  records where each module it built was attached (``register_module_module_registration_hook``), walks each
  resulting model from its root and turns skipped layers back into dense ``nn.Linear`` on meta, in place. A
  ``copy.deepcopy`` of a built layer (``nn.TransformerEncoder``'s layer clones) is a ``QuantizedLinear`` that still
  carries a meta stand-in ``weight``: the walk treats it as a layer built in the block.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import torch
import wrapt
from aqlm import QuantizedLinear
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from .config import AqlmConfig, ConfigLike, SkipPattern, as_config
from .kernels import install_kernels
from .layers import (
    check_divisible,
    indivisible_layers_error,
    layer_config,
    make_dense_in_place,
    new_quantized_linear,
    original_linear_init,
    strip_foreign_parameters,
)
from .matching import SkipMatcher
from .substitutions import substitution_for

__all__ = ["aqlm_quantized"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _BuiltLayer:
    """A linear layer built inside a block, and what it was built with."""

    module: nn.Module
    in_features: int
    out_features: int
    dtype: torch.dtype
    device: torch.device
    source: str
    placeholder: nn.Parameter | None = None
    own_bias: nn.Parameter | None = None

    def drop_placeholder(self) -> nn.Parameter | None:
        """Remove the stand-ins (``weight``, ``reset_parameters``) if the module still has them, and return the
        weight: its ``requires_grad`` and dtype are what model code made of the layer's weight
        (``.requires_grad_(False)``, ``.to(torch.bfloat16)``) while it was quantized."""
        if self.module.__dict__.get("reset_parameters") is _reset_stand_in:
            del self.module.__dict__["reset_parameters"]
        placeholder, self.placeholder = self.placeholder, None
        if placeholder is None or self.module._parameters.get("weight") is not placeholder:
            return None
        del self.module._parameters["weight"]
        return placeholder


@dataclass(eq=False)
class _Block:
    """One open ``with aqlm_quantized(...)`` in one thread or task.

    ``parents`` are the modules something was attached to, the one attached to last at the end; ``children`` are
    held weakly, so a module that is gone is nobody's child (its ``id`` may be a new module's by then).
    """

    owner: aqlm_quantized
    thread: int = field(default_factory=threading.get_ident)
    open: bool = True
    mode: _MetaByDefault | None = None
    layers: list[_BuiltLayer] = field(default_factory=list)
    parents: dict[int, nn.Module] = field(default_factory=dict)
    templates: dict[tuple[int, int, bool, torch.dtype], QuantizedLinear] = field(default_factory=dict)
    children: weakref.WeakSet[nn.Module] = field(default_factory=weakref.WeakSet)

    def build_linear(
        self,
        module: nn.Linear,
        in_features: int,
        out_features: int,
        bias: bool,
        device: Any,
        dtype: torch.dtype | None,
    ) -> None:
        """Initialise ``module`` (a fresh ``nn.Linear``) as a QuantizedLinear on meta, or as a meta Linear."""
        config = self.owner.config
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        # Without an explicit device, where torch.device(...) modes and this block's meta default would put it.
        built_on = torch.device(device) if device is not None else torch.empty(0).device
        source = _caller_location()
        layer = _BuiltLayer(module, in_features, out_features, dtype, built_on, source)
        if check_divisible(in_features, out_features, config, source) is not None:
            # Not storable in these groups: stays a meta Linear; the block's end skips it or says why it cannot.
            original_linear_init(module, in_features, out_features, bias, device=built_on, dtype=dtype)
        else:
            with torch._C.DisableTorchFunction():  # every tensor below names its device: skip Python modes (speed)
                self._init_quantized(module, in_features, out_features, bias, config.dtype or dtype)
                # Until the block ends the layer also has the meta ``weight`` a Linear would have and a no-op
                # ``reset_parameters``, and its integer ``codes`` are a buffer, so model code that looks at it
                # while building (transformers' tie_weights expands tied names against named_parameters(), a model
                # freezes a sub-module, initialises every parameter with nn.init.normal_ or resets a layer) sees a
                # Linear. The block's end makes the codes a parameter again and removes the stand-ins.
                layer.placeholder = nn.Parameter(torch.empty(out_features, in_features, device="meta", dtype=dtype))
                module._parameters["weight"] = layer.placeholder
                module._buffers["codes"] = cast(nn.Parameter, module._parameters.pop("codes")).data  # moves with .to()
                module.__dict__["reset_parameters"] = _reset_stand_in
                layer.own_bias = module._parameters["bias"]
            install_kernels(module)
        self.layers.append(layer)  # only once built: a construction that raised (and was caught) is no layer

    def _init_quantized(
        self, module: nn.Module, in_features: int, out_features: int, bias: bool, dtype: torch.dtype
    ) -> None:
        """Initialise ``module`` as an empty QuantizedLinear on meta, like ``QuantizedLinear.__init__`` would.

        aqlm's ``__init__`` runs once per layer shape (a template); each layer then gets the template's state with
        its own containers and fresh meta parameters, which costs a fraction of ``nn.Module.__setattr__``.
        """
        key = (in_features, out_features, bias, dtype)
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = new_quantized_linear(
                in_features, out_features, bias, self.owner.config, dtype
            )
        state = {key: _fresh(value) for key, value in vars(template).items()}
        state["_parameters"] = {
            name: None
            if param is None
            else nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
            for name, param in template._parameters.items()
        }
        module.__dict__.update(state)
        module.__class__ = QuantizedLinear

    def _copies(self, roots: list[nn.Module]) -> list[_BuiltLayer]:
        """Deep copies of built layers under ``roots``: QuantizedLinear layers that carry a meta stand-in weight."""
        known = {id(layer.module) for layer in self.layers} | _layers_of_open_blocks()  # an outer block's are its own
        placeholders = {id(layer.placeholder) for layer in self.layers if layer.placeholder is not None}
        device = torch.device("meta") if self.owner.init_on_meta else torch.get_default_device()
        copies = []
        for root in roots:
            for module in root.modules():
                if type(module) is not QuantizedLinear or id(module) in known or not _block_open(module):
                    continue
                weight = module._parameters.get("weight")
                if not isinstance(weight, nn.Parameter) or not weight.is_meta:
                    continue
                known.add(id(module))
                in_features, out_features = cast(int, module.in_features), cast(int, module.out_features)
                layer = _BuiltLayer(module, in_features, out_features, weight.dtype, device, "a copy made in the block")
                # A copy whose weight is another layer's stand-in is tied to that layer (b = deepcopy(a);
                # b.weight = a.weight), not the owner of that stand-in.
                layer.placeholder = None if id(weight) in placeholders else weight
                layer.own_bias = module._parameters.get("bias")
                placeholders.add(id(weight))
                copies.append(layer)
        return copies

    def close_stand_ins(self) -> None:
        """After the block (finished or failed): no layer it built, nor a copy of one, keeps a stand-in weight, the
        no-op ``reset_parameters`` or its codes as a buffer."""
        stand_ins = {id(layer.placeholder) for layer in self.layers if layer.placeholder is not None}
        for layer in self.layers:
            layer.drop_placeholder()
            if isinstance(layer.module, QuantizedLinear):
                _codes_to_parameter(layer.module)
                weight = layer.module._parameters.get("weight")
                if weight is not None and id(weight) in stand_ins:  # tied to another layer's stand-in
                    del layer.module._parameters["weight"]
        roots = [*self.parents.values(), *(layer.module for layer in self.layers)]
        others = _layers_of_open_blocks()  # an enclosing block still open finishes its own layers
        for module in {id(m): m for root in roots for m in root.modules()}.values():
            if isinstance(module, QuantizedLinear) and _block_open(module) and id(module) not in others:
                # a copy that no root reached, or one of a failed block
                del module.__dict__["reset_parameters"]
                _codes_to_parameter(module)
                weight = module._parameters.get("weight")
                if weight is not None and weight.is_meta:  # its stand-in weight (a copy of one)
                    del module._parameters["weight"]

    def note_registration(self, parent: nn.Module, child: nn.Module) -> None:
        self.parents.pop(id(parent), None)
        self.parents[id(parent)] = parent
        self.children.add(child)

    @staticmethod
    def _as_built(layers: dict[int, _BuiltLayer]) -> Callable[[nn.Module], nn.Module]:
        """Shows callable skip patterns each quantized layer as the meta ``nn.Linear`` the model code asked for."""
        stand_ins: dict[int, nn.Module] = {}

        def present(module: nn.Module) -> nn.Module:
            layer = layers.get(id(module))
            if layer is None or not isinstance(module, QuantizedLinear):
                return module
            if id(module) not in stand_ins:
                stand_in = nn.Linear.__new__(nn.Linear)
                original_linear_init(
                    stand_in, layer.in_features, layer.out_features, module.bias is not None, "meta", layer.dtype
                )
                stand_ins[id(module)] = stand_in
            return stand_ins[id(module)]

        return present

    def finish(self, first_roots: Iterable[nn.Module] = ()) -> None:
        """Apply the skip patterns to every layer this block built, relative to the model it ended up in.

        Raises:
            ValueError: layers that are not skipped cannot be split into the config's groups, or layers were
                reparametrized (``parametrize``, weight or spectral norm, pruning) while quantized; nothing changed.
        """
        matcher, config = self.owner.matcher, self.owner.config
        # Models attached to last first: a layer that passed through a temporary container (nn.Sequential(layer)
        # to count its parameters) takes its path from the model it ended up in.
        # A module attached without the registration hook (ModuleList.insert writes _modules itself) is no child
        # that the block saw: it is a root only if no other root reaches it.
        first = list(first_roots)
        candidates = [m for m in reversed(self.parents.values()) if m not in self.children]
        reached = {id(m) for root in [*first, *candidates] for m in root.modules() if m is not root}
        roots = [*first, *(m for m in candidates if id(m) not in reached)]
        self.layers += self._copies(roots)
        built = {id(layer.module): layer for layer in self.layers}
        present = self._as_built(built) if matcher.has_callables else None
        # A layer takes its path from the first root that reaches it, and is skipped if a skip pattern matches any
        # of its paths (it may also sit in a container made to count parameters, or in a second model); layers
        # attached to nothing are their own roots.
        paths: dict[int, str] = {}
        skips: set[int] = set()
        used: set[int] = set()
        for root in [*roots, *(layer.module for layer in self.layers)]:
            if id(root) in built and id(root) in paths:
                continue
            found = matcher.resolve(root, present=present)
            used |= found.used
            for key, (path, _) in found.modules.items():
                if key in built:
                    paths.setdefault(key, path)
                    if key in found.skipped:
                        skips.add(key)
        decided = [(layer, paths[id(layer.module)], id(layer.module) in skips) for layer in self.layers]
        problems = [
            message
            for layer, path, skipped in decided
            if not skipped
            and (message := check_divisible(layer.in_features, layer.out_features, config, _where(path, layer)))
        ]
        if problems:
            raise indivisible_layers_error(problems, config)
        foreign_codes = [
            _where(path, layer)
            for layer, path, skipped in decided
            if not skipped and isinstance(layer.module, QuantizedLinear) and _codes_buffer(layer.module) is None
        ]
        if foreign_codes:
            raise ValueError(
                "model code gave these layers, which aqlm_quantized built as QuantizedLinear, a 'codes' buffer or "
                "attribute of its own (a quantized layer's codes have that name); rename it, or skip the layer:"
                + "".join(f"\n  {p}" for p in foreign_codes)
            )
        parametrized = [
            _where(path, layer)
            for layer, path, _ in decided
            if isinstance(layer.module, QuantizedLinear) and _reparametrized(layer.module)
        ]
        if parametrized:
            raise ValueError(
                "these layers were reparametrized (torch.nn.utils.parametrize or parametrizations.weight_norm / "
                "spectral_norm, the older torch.nn.utils.weight_norm / spectral_norm hooks, or torch.nn.utils.prune) "
                "while aqlm_quantized built them, when they had no weight of their own; build them outside the "
                "block, or reparametrize them after it (skipped ones):" + "".join(f"\n  {p}" for p in parametrized)
            )
        for layer, _, skipped in decided:
            if not skipped and isinstance(layer.module, QuantizedLinear):
                _codes_to_parameter(layer.module)
        # Layers whose weight was tied to a built layer's (stand-in) weight form a group with it, that layer first:
        # as with the visitor, the group's quantized layers share one set of codes and its dense layers one weight.
        placeholders = {id(layer.placeholder): layer for layer in self.layers if layer.placeholder is not None}
        groups: dict[int, list[_BuiltLayer]] = {}
        shared_stand_ins: dict[int, nn.Parameter] = {}  # group -> the stand-in weight its members share
        for layer, _, _ in decided:
            owner = placeholders.get(id(layer.module._parameters.get("weight")))
            if owner is not None and owner is not layer:
                groups.setdefault(id(owner), [owner]).append(layer)
                shared_stand_ins[id(owner)] = cast(nn.Parameter, owner.placeholder)
        skipped_ids = {id(layer.module) for layer, _, skipped in decided if skipped}
        grouped = {id(member.module) for group in groups.values() for member in group}
        codes_from: dict[int, _BuiltLayer] = {}  # a quantized group member -> the first quantized one
        for group in groups.values():
            kept = [member for member in group if id(member.module) not in skipped_ids]
            formats = [layer_config(cast(QuantizedLinear, member.module)) for member in kept]
            for member, member_format in zip(kept[1:], formats[1:], strict=True):
                if member_format.same_format(formats[0]):
                    codes_from[id(member.module)] = kept[0]
        # id -> (a stand-in weight or old bias, what replaces it)
        dense_weights: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        for layer, path, skipped in decided:
            stand_in = layer.placeholder
            placeholder = layer.drop_placeholder()
            if skipped:
                if isinstance(layer.module, QuantizedLinear):
                    if _codes_buffer(layer.module) is not None:
                        del layer.module._buffers["codes"]
                    tied_bias = layer.module._parameters.get("bias") is not layer.own_bias
                    dtype = placeholder.dtype if placeholder is not None else layer.dtype
                    requires_grad = placeholder is None or placeholder.requires_grad
                    make_dense_in_place(layer.module, layer.device, dtype, requires_grad, keep_bias=tied_bias)
                    if stand_in is not None:
                        dense_weights[id(stand_in)] = (stand_in, layer.module._parameters["weight"])
                    if not tied_bias and layer.own_bias is not None:  # another layer may hold its old bias
                        dense_weights[id(layer.own_bias)] = (layer.own_bias, layer.module._parameters["bias"])
                continue
            if id(layer.module) in grouped:  # tied to a stand-in weight: the group shares codes instead
                layer.module._parameters.pop("weight", None)
                source = codes_from.get(id(layer.module))
                for name in ("codebooks", "codes", "scales") if source is not None else ():
                    layer.module._parameters[name] = source.module._parameters[name]  # type: ignore[union-attr]
            if foreign := strip_foreign_parameters(layer.module):
                logger.info("%s: dropped %s assigned to a quantized layer (ties are undone)", path, foreign)
        for key, group in groups.items():  # the group's dense layers: the owner's final weight, or one new weight
            dense = [member for member in group if isinstance(member.module, nn.Linear)]
            if not dense:
                continue
            lead = dense[0]
            weight = lead.module._parameters.get("weight") if lead is group[0] else None
            if weight is None:  # the owner stays quantized: a new weight, as the shared stand-in was made
                stand_in = shared_stand_ins[key]
                template = nn.Linear.__new__(nn.Linear)
                original_linear_init(template, lead.in_features, lead.out_features, False, lead.device, stand_in.dtype)
                weight = template._parameters["weight"]
                weight.requires_grad_(stand_in.requires_grad)  # type: ignore[union-attr]
            for member in dense:
                member.module._parameters["weight"] = weight
        if dense_weights:  # other modules holding a skipped layer's stand-in or old bias (nanoGPT's wte.weight)
            for module in {id(m): m for root in roots for m in root.modules()}.values():
                for name, param in module._parameters.items():
                    stand_in, weight = dense_weights.get(id(param), (None, None))
                    if param is not None and param is stand_in:
                        module._parameters[name] = weight
        if self.layers:  # a block that built no layer (a nested block built them all) has nothing to report
            matcher.warn_unused(used, self.owner._warning_name)
        quantized = sum(not skipped for _, _, skipped in decided)
        logger.info(
            "aqlm_quantized: %d Linear layers built as QuantizedLinear (%s), %d kept dense by skip",
            quantized,
            config.format_name,
            len(decided) - quantized,
        )


_REPARAMETRIZING_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)


def _reparametrized(module: nn.Module) -> bool:
    """Whether ``module``'s weight was reparametrized: a parametrization, or a weight-norm, spectral-norm or
    pruning pre-hook (the older APIs, which move the weight to ``weight_g`` / ``weight_orig``)."""
    hooks = module._forward_pre_hooks.values()
    return parametrize.is_parametrized(module) or any(isinstance(hook, _REPARAMETRIZING_HOOKS) for hook in hooks)


def _reset_stand_in() -> None:
    """``reset_parameters`` of a layer while its block is open: it has nothing to reset (all on meta)."""


def _layers_of_open_blocks() -> set[int]:
    """Ids of the layers that the blocks still open in this context built."""
    return {id(layer.module) for block in _BLOCKS.get() if block.open for layer in block.layers}


def _block_open(module: nn.Module) -> bool:
    """Whether ``module`` is a layer (or a copy of one) whose block has not yet finished it."""
    return module.__dict__.get("reset_parameters") is _reset_stand_in


def _codes_buffer(layer: QuantizedLinear) -> torch.Tensor | None:
    """The layer's ``codes`` buffer if it is the one this library made while the layer's block was open (the
    layer's codes: their shape and integer dtype), not one of the model's own."""
    buffer = layer._buffers.get("codes")
    config = layer_config(layer)
    shape = (
        cast(int, layer.out_features) // config.out_group_size,
        cast(int, layer.in_features) // config.in_group_size,
        config.num_codebooks,
    )
    return buffer if buffer is not None and tuple(buffer.shape) == shape and buffer.dtype == config.code_dtype else None


def _codes_to_parameter(module: QuantizedLinear) -> None:
    """Make the codes a layer carried as a buffer while its block was open a parameter again (after ``codebooks``,
    as aqlm orders them), unless the layer has codes (it was given another's)."""
    if _codes_buffer(module) is None:
        return
    buffer = cast(torch.Tensor, module._buffers.pop("codes"))
    parameters = module._parameters
    if "codes" in parameters:
        return
    codes = nn.Parameter(buffer, requires_grad=False)
    items = list(parameters.items())
    parameters.clear()
    for name, value in items:
        parameters[name] = value
        if name == "codebooks":
            parameters["codes"] = codes
    parameters.setdefault("codes", codes)


def _fresh(value: Any) -> Any:
    """A module attribute for a new module: containers (parameters, buffers, hooks) copied, others shared."""
    return value.copy() if isinstance(value, (dict, set)) else value


def _where(path: str, layer: _BuiltLayer) -> str:
    return f"{path or '<root>'} (built at {layer.source})"


_OWN_FILES = (os.path.dirname(__file__), os.path.dirname(nn.__file__), os.path.dirname(wrapt.__file__))


def _caller_location() -> str:
    """``file:line`` of the first frame outside torch.nn, wrapt and aqlm_ctx: the line that built the layer."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_FILES):
        frame = frame.f_back  # type: ignore[assignment]
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "<unknown>"


# ---------------------------------------------------------------------------------------------------------------
# Per-context state: which blocks are open in this thread / asyncio task.

_BLOCKS: contextvars.ContextVar[tuple[_Block, ...]] = contextvars.ContextVar("aqlm_ctx_blocks", default=())


def _innermost_block() -> _Block | None:
    """The innermost block of this context that is still open, if this thread opened it.

    A context copied inside a block (``contextvars.copy_context()``, an asyncio task started there) keeps the block
    in its tuple after the block ends: ended blocks are passed over. ``asyncio.to_thread`` and executors that copy
    the context carry the blocks into other threads, where the meta-device mode is not on: those build ordinary
    modules.
    """
    for block in reversed(_BLOCKS.get()):
        if block.open:
            return block if block.thread == threading.get_ident() else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Meta device by default, per thread, gated by the context of the caller.

_FACTORIES = _device_constructors()


class _MetaByDefault(TorchFunctionMode):
    """Puts tensors on meta for factory calls without ``device=``, for the context whose innermost open block is
    ``block`` only (another task of the thread, with its own blocks and ``torch.device`` contexts, is not touched)."""

    def __init__(self, block: _Block) -> None:
        super().__init__()
        self.block = block

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        wants_meta = self.block.owner.init_on_meta and func in _FACTORIES and kwargs.get("device") is None
        if wants_meta and _innermost_block() is self.block:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _push_mode(block: _Block) -> _MetaByDefault:
    """A new meta-device mode for ``block`` on top of this thread's torch function stack: each block pushes its own,
    so that, as with ``torch.device`` modes, the innermost of a block and a ``with torch.device(...)`` decides."""
    mode = _MetaByDefault(block)
    mode.__enter__()
    return mode


def _remove_mode(mode: _MetaByDefault) -> None:
    """Take ``mode`` off this thread's torch function stack, leaving the modes above it in place (another task of
    this thread may have pushed one after it and still be inside it)."""
    above: list[Any] = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


# ---------------------------------------------------------------------------------------------------------------
# Process-wide patches, present only while some thread has a block open.


def _linear_init_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    block = _innermost_block()
    if block is None or type(instance) is not nn.Linear:
        return wrapped(*args, **kwargs)
    return _call_build(block, instance, *args, **kwargs)


def _call_build(
    block: _Block,
    module: nn.Linear,
    in_features: int,
    out_features: int,
    bias: bool = True,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> None:
    block.build_linear(module, in_features, out_features, bias, device, dtype)


def _registration_hook(parent: nn.Module, name: str, child: nn.Module | None) -> nn.Module | None:
    block = _innermost_block()
    if block is None or child is None:
        return None
    substitution = substitution_for(child)
    if substitution is not None:
        child = substitution.build(child)  # its nn.Linear layers are built inside this block: quantized
    block.note_registration(parent, child)
    return child


class _Patches:
    """Reference-counted process-wide patches: installed with the first open block, removed with the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders: dict[threading.Thread, int] = {}
        self.original: Any = None
        self.hook: Any = None

    def acquire(self) -> None:
        with self.lock:
            self._forget_dead_threads()
            if self.original is None:
                self.original = vars(nn.Linear)["__init__"]
                nn.Linear.__init__ = wrapt.FunctionWrapper(self.original, _linear_init_wrapper)  # type: ignore[method-assign]
                self.hook = nn.modules.module.register_module_module_registration_hook(_registration_hook)  # type: ignore[arg-type]
            thread = threading.current_thread()
            self.holders[thread] = self.holders.get(thread, 0) + 1

    def release(self) -> None:
        with self.lock:
            thread = threading.current_thread()
            self.holders[thread] -= 1
            if not self.holders[thread]:
                del self.holders[thread]
            self._forget_dead_threads()
            if not self.holders and self.original is not None:
                nn.Linear.__init__ = self.original  # type: ignore[method-assign]
                self.hook.remove()
                self.original = self.hook = None

    def _forget_dead_threads(self) -> None:
        for thread in [thread for thread in self.holders if not thread.is_alive()]:
            del self.holders[thread]  # it opened a block and ended without closing it


_patches = _Patches()


class aqlm_quantized:
    """Build models whose ``nn.Linear`` layers come out as ``aqlm.QuantizedLinear`` on the meta device.

    Inside the block every layer built as exactly ``nn.Linear`` (not a subclass: ``nn.MultiheadAttention``'s
    ``out_proj`` and LoRA layers stay as they are) is an empty ``QuantizedLinear`` on meta, in ``config.dtype`` or
    else the dtype the Linear was built with. With ``init_on_meta`` (the default) every other tensor whose
    factory call names no ``device`` lands on meta too, so a 70B config allocates no weight memory.

    When the block ends, skip patterns are applied relative to the model each layer ended up in (the top-most
    module built or attached to inside the block); skipped layers become dense ``nn.Linear`` on meta again, in
    place, keeping a ``weight`` the model tied to them. A pattern that matched no module is reported in a warning.
    While the block is open each quantized layer also carries a meta ``weight`` stand-in and a no-op
    ``reset_parameters``, and keeps its integer ``codes`` out of its parameters, so model code that looks at it
    during construction (transformers' tied-weight expansion, freezing a sub-module, ``nn.init.normal_`` on every
    parameter, resetting a layer) works as with a Linear; when the block ends the stand-ins go and the codes become a
    parameter again (layers tied to another layer's weight then share its codes). Code that dispatches on
    ``isinstance(layer, nn.Linear)`` while building sees a QuantizedLinear, though: convert such models with
    :func:`aqlm_ctx.replace_linear_layers`.

    Device and dtype: ``device=`` passed to an ``nn.Linear`` is ignored for quantized layers (they have no codes
    until a checkpoint is loaded; :func:`aqlm_ctx.load_checkpoint` places them) and used for skipped ones;
    ``dtype=`` is used for codebooks, scales and bias unless ``config.dtype`` is set (a ``.to(dtype)`` of the model
    inside the block reaches both). Other factory calls with an explicit ``device=`` keep it, and a
    ``with torch.device(...)`` inside the block wins where it applies (``torch.set_default_device`` does not: the
    block's meta default sits above it). With ``init_on_meta=False`` a skipped layer gets ``nn.Linear``'s default
    initialisation when the block ends: what the model's own code initialised inside the block was the quantized
    layer's stand-in, so load the layer's weights or initialise it after the block. A layer reparametrized inside
    the block (``weight_norm``, ``spectral_norm``, pruning) is refused. A ``copy.deepcopy`` of a layer made inside
    the block counts as built there once it is attached to a model of the block (``nn.TransformerEncoder``'s
    clones); copy a whole model after the block ends.

    Scope: only the thread or asyncio task that entered the block, and asyncio tasks it starts inside the block, are
    affected, and only while the block is open; others building models at the same time get ordinary layers, and
    so does a task or copied context that outlives the block. Blocks nest (the inner config applies to what is built
    inside it, and each block applies its own skips; the innermost of blocks and ``torch.device`` contexts decides
    where other tensors go); the same object may be entered again while open. If the block ends with an exception,
    layers are left as built and no skips are applied.

    Args:
        config: anything :func:`aqlm_ctx.as_config` accepts; its ``skip`` patterns apply.
        skip: more skip patterns, applied together with the config's.
        init_on_meta: put all other tensors built without an explicit device on meta too.

    Raises:
        ValueError: on exit, a layer that is not skipped cannot be split into the config's groups (the message
            names its path, the line that built it, its shape and the group sizes), or a quantized layer was
            reparametrized (``weight_norm``, ``spectral_norm``, pruning) inside the block.
        RuntimeError: blocks were exited in a different order than they were entered.

    Example:
        >>> with aqlm_quantized(AqlmConfig(num_codebooks=2, nbits_per_codebook=8), skip=["lm_head"]):
        ...     model = MyLM(config)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: ConfigLike | None = None,
        skip: SkipPattern | Iterable[SkipPattern] | None = None,
        *,
        init_on_meta: bool = True,
    ) -> None:
        self.config: AqlmConfig = as_config(config).with_skip(skip)
        self.matcher = SkipMatcher(self.config.skip)
        self.init_on_meta = bool(init_on_meta)
        self._warning_name = "aqlm_quantized"  # what warnings call it (@quantize_model names its factory)

    def __repr__(self) -> str:
        return f"aqlm_quantized({self.config!r}, init_on_meta={self.init_on_meta})"

    def __enter__(self) -> aqlm_quantized:
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._close(apply_skips=exc_type is None)

    def _is_innermost(self) -> bool:
        """Whether this object's block is the innermost open block of the calling context."""
        block = _innermost_block()
        return block is not None and block.owner is self

    def _open(self) -> _Block:
        block = _Block(self)
        _patches.acquire()
        try:
            block.mode = _push_mode(block)
        except BaseException:
            _patches.release()
            raise
        _BLOCKS.set((*_BLOCKS.get(), block))
        return block

    def _close(self, apply_skips: bool, first_roots: Iterable[nn.Module] = ()) -> None:
        blocks = _BLOCKS.get()
        if not blocks or blocks[-1].owner is not self:
            innermost = repr(blocks[-1].owner) if blocks else "none (no block is open in this thread or task)"
            raise RuntimeError(
                "aqlm_quantized blocks must be exited in the reverse order they were entered: "
                f"exiting {self!r}, but the innermost open block is {innermost}"
            )
        block = blocks[-1]
        block.open = False
        _BLOCKS.set(blocks[:-1])
        try:
            _remove_mode(cast(_MetaByDefault, block.mode))
        finally:
            _patches.release()
        try:
            if apply_skips:
                block.finish(first_roots)
        finally:
            block.close_stand_ins()

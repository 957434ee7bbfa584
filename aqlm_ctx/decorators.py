"""``@quantize_model``: run a model factory under :class:`aqlm_ctx.aqlm_quantized`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import wrapt
from torch import nn

from .config import AqlmConfig, ConfigLike, SkipPattern, as_config
from .construction import aqlm_quantized

__all__ = ["quantize_model"]

Factory = TypeVar("Factory", bound=Callable[..., Any])


def quantize_model(
    config: ConfigLike | None = None,
    skip: SkipPattern | Iterable[SkipPattern] | None = None,
    *,
    init_on_meta: bool = True,
) -> Callable[[Factory], Factory]:
    """Decorate a model factory so the model it builds comes out quantized, as under :class:`aqlm_quantized`.

    Works on functions, methods, classmethods (``from_config``-style constructors, in either decorator order)
    and staticmethods; the signature and docstring are kept. Skip paths are relative to the model the factory
    returns (layers it built that are not part of that model are resolved relative to their own root). A factory
    that calls itself to build sub-models (towers of a composite model) builds them into the outermost call's
    model: skip paths are relative to that one.

    Args:
        config: anything :func:`aqlm_ctx.as_config` accepts.
        skip: more skip patterns, applied together with the config's.
        init_on_meta: as for :class:`aqlm_quantized`.

    Raises:
        TypeError: used bare (``@quantize_model`` without a config call), applied to something that is not
            callable, or (when called) the factory returned something that is not an ``nn.Module``.

    Example:
        >>> @quantize_model(AqlmConfig(), skip=["lm_head"])
        ... def build(config):
        ...     return MyTransformer(config)  # doctest: +SKIP
    """
    if callable(config) and not isinstance(config, (AqlmConfig, Mapping)) and not hasattr(config, "quant_method"):
        name = getattr(config, "__qualname__", repr(config))
        raise TypeError(
            f"quantize_model needs a config: write @quantize_model(config, skip=[...]) above {name}, "
            "not @quantize_model"
        )
    checked = as_config(config).with_skip(skip)  # errors in the config show where the decorator is applied

    def decorate(factory: Factory) -> Factory:
        if not callable(factory) and not isinstance(factory, (classmethod, staticmethod)):
            raise TypeError(f"@quantize_model decorates a callable model factory, got {type(factory).__name__}")
        context = aqlm_quantized(checked, init_on_meta=init_on_meta)
        named = getattr(factory, "__func__", factory)
        context._warning_name = f"@quantize_model on {getattr(named, '__qualname__', repr(named))}"

        @wrapt.decorator
        def build_quantized(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
            if context._is_innermost():  # the factory calls itself (sub-models): its layers are the outer call's
                return _checked_model(wrapped, wrapped(*args, **kwargs))
            context._open()
            try:
                model = _checked_model(wrapped, wrapped(*args, **kwargs))
            except BaseException:
                context._close(apply_skips=False)
                raise
            context._close(apply_skips=True, first_roots=[model])
            return model

        return build_quantized(factory)  # type: ignore[return-value]

    return decorate


def _checked_model(factory: Callable[..., Any], model: Any) -> nn.Module:
    """``model``, which the decorated ``factory`` returned, if it is a module.

    Raises:
        TypeError: it is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        name = getattr(factory, "__qualname__", repr(factory))
        raise TypeError(
            f"{name} is decorated with @quantize_model but returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model

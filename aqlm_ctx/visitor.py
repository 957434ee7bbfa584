"""Post-hoc conversion of a model that already exists, and the drop-in for transformers' integration."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .config import AqlmConfig, ConfigLike, SkipPattern, as_config
from .layers import (
    check_divisible,
    indivisible_layers_error,
    make_all_quantized_in_place,
    new_quantized_linear,
    shared_parameters,
)
from .matching import SkipMatcher
from .substitutions import SwappedModules

__all__ = ["replace_linear_layers", "replace_with_aqlm_linear", "select_linear_layers"]

logger = logging.getLogger(__name__)


def select_linear_layers(
    model: nn.Module, config: AqlmConfig, where: str, prefix: str = ""
) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """The exact ``nn.Linear`` layers of ``model`` that ``config``'s skip patterns leave to quantize.

    Warns (naming ``where``) about patterns that match no module.

    Returns:
        ``(path, layer)`` for each selected layer, and a message for each one the groups cannot split.
    """
    matcher = SkipMatcher(config.skip)
    found = matcher.resolve(model, prefix)
    matcher.warn_unused(found.used, where)
    targets = [
        (path, module)
        for key, (path, module) in found.modules.items()
        if type(module) is nn.Linear and key not in found.skipped
    ]
    problems = [
        message
        for path, module in targets
        if (message := check_divisible(module.in_features, module.out_features, config, path or "<root>"))
    ]
    return targets, problems


def _replace(
    model: nn.Module, config: ConfigLike | None, skip: SkipPattern | Iterable[SkipPattern] | None, prefix: str
) -> list[nn.Module]:
    """Convert every selected ``nn.Linear`` of ``model`` in place; return the converted modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to convert, got {type(model).__name__}")
    aqlm_config = as_config(config).with_skip(skip)
    swaps = SwappedModules(model)
    undo: Callable[[], None] | None = None
    try:  # all or nothing: on any error (a skip callable, KeyboardInterrupt) the model ends untouched
        targets, problems = select_linear_layers(model, aqlm_config, "replace_linear_layers", prefix)
        selected = {id(module) for _, module in targets}
        unfillable = swaps.unfillable(  # only layers that stay dense need the original's weights
            model, prefix, lambda new: any(type(m) is nn.Linear and id(m) not in selected for m in new.modules())
        )
        if problems:
            raise indivisible_layers_error(problems, aqlm_config, "; the model was not changed")
        if unfillable:
            raise ValueError(
                "these substituted modules have real weights and layers that stay dense, but their substitution has "
                "no fill to give those layers the original weights; convert the model on meta, or skip none of "
                f"their layers (the model was not changed): {', '.join(unfillable)}"
            )
        # Build every replacement first, then swap.
        templates = [
            new_quantized_linear(
                module.in_features, module.out_features, module.bias is not None, aqlm_config, module.weight.dtype
            )
            for _, module in targets
        ]
        shared = shared_parameters(model)
        first_with_weight: dict[int, nn.Module] = {}
        for (_, module), template in zip(targets, templates, strict=True):
            first = first_with_weight.setdefault(id(module.weight), template)
            if first is not template:  # layers that share one weight share its codes, codebooks and scales
                for name in ("codebooks", "codes", "scales"):
                    template._parameters[name] = first._parameters[name]
            bias = module.bias
            if bias is not None and id(bias) in shared and bias.dtype == template.bias.dtype:
                template._parameters["bias"] = bias  # a bias tied to another module (BERT's decoder) stays tied
        undo = make_all_quantized_in_place(
            (module, template) for (_, module), template in zip(targets, templates, strict=True)
        )
        swaps.fill()  # layers that stay dense get the original's weights
    except BaseException:  # the layers back, then the substituted modules
        if undo is not None:
            undo()
        swaps.undo()
        raise
    logger.info(
        "replaced %d Linear layers with QuantizedLinear (%s); %d kept dense by skip",
        len(targets),
        aqlm_config.format_name,
        sum(type(module) is nn.Linear for module in model.modules()),
    )
    return [module for _, module in targets]


def replace_linear_layers(
    model: nn.Module,
    config: ConfigLike | None = None,
    skip: SkipPattern | Iterable[SkipPattern] | None = None,
) -> nn.Module:
    """Turn every ``nn.Linear`` of an existing model into an empty ``aqlm.QuantizedLinear`` on meta, in place.

    Exactly ``nn.Linear`` instances are converted (not subclasses), with the same skip semantics as
    :class:`aqlm_ctx.aqlm_quantized`. Each layer keeps its identity (hooks, attributes, every reference to it) and
    gets codebooks and scales in ``config.dtype`` or its weight's dtype; its old weight is released (a weight tied
    to another module lives on there). Layers that shared one weight share their codes, codebooks and scales, and a
    bias tied to another module stays tied. The new layers have no codes until a checkpoint is loaded.

    Args:
        model: the model; with real weights or on meta.
        config: anything :func:`aqlm_ctx.as_config` accepts.
        skip: more skip patterns, applied together with the config's.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module, or a pattern has the wrong type.
        ValueError: layers that are not skipped cannot be split into the config's groups; the model is unchanged.

    Example:
        >>> model = replace_linear_layers(model, AqlmConfig(), skip=["lm_head"])  # doctest: +SKIP
    """
    _replace(model, config, skip, prefix="")
    return model


def replace_with_aqlm_linear(
    model: nn.Module,
    quantization_config: Any = None,
    linear_weights_not_to_quantize: list[str] | None = None,
    current_key_name: list[str] | None = None,
    has_been_replaced: bool = False,
    *,
    modules_to_not_convert: list[str] | None = None,
) -> tuple[nn.Module, bool]:
    """Drop-in for ``transformers.integrations.aqlm.replace_with_aqlm_linear``, built on :func:`replace_linear_layers`.

    The seed's signature and ``(model, has_been_replaced)`` return, and transformers 5's ``modules_to_not_convert``
    keyword; skip names follow aqlm_ctx's semantics, so both the hub's ``"lm_head.weight"`` and ``"lm_head"`` keep
    lm_head dense. As in the seed, the layers under ``model`` are converted, not ``model`` itself. Converted layers get
    ``source_cls`` as before.

    Args:
        model: the model to convert in place.
        quantization_config: anything :func:`aqlm_ctx.as_config` accepts (``transformers.AqlmConfig``, or any
            object with its four format attributes, as the seed reads them).
        linear_weights_not_to_quantize: skip patterns (parameter or module names).
        current_key_name: path of ``model`` inside a larger model; patterns are matched on the full path.
        has_been_replaced: carried into the result (``or``-ed with whether this call converted a layer).
        modules_to_not_convert: more skip patterns (transformers 5's name for the same list).

    Returns:
        ``(model, has_been_replaced)``.
    """
    if type(model) is nn.Linear:  # the seed walks the children of ``model``
        return model, has_been_replaced
    skip = [*(linear_weights_not_to_quantize or []), *(modules_to_not_convert or [])]
    prefix = ".".join(current_key_name or [])
    replaced = _replace(model, quantization_config, skip, prefix)
    for module in replaced:
        setattr(module, "source_cls", nn.Linear)  # noqa: B010 - seed compatibility; not a Module attribute
    return model, has_been_replaced or bool(replaced)

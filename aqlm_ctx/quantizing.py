"""``quantize_weights_``: encode the linear layers of a model with real weights into AQLM, in place."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .config import ConfigLike, SkipPattern, as_config
from .encoding import check_encode_options, encode_linear
from .layers import indivisible_layers_error, make_all_quantized_in_place, new_quantized_linear
from .visitor import select_linear_layers

__all__ = ["quantize_weights_"]

logger = logging.getLogger(__name__)


def _calibration_input(path: str, in_features: int, batch: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input of a ``Linear`` call (positional or ``input=``), checked against the layer.

    Raises:
        TypeError: there is no input, or it is not a tensor.
        ValueError: its last dimension is not ``in_features``, or it has NaN or infinite values.
    """
    where = f"calibration batch {batch}: layer {path or '<root>'!r}"
    if args:
        x = args[0]
    elif "input" in kwargs:
        x = kwargs["input"]
    else:
        raise TypeError(f"{where} was called without an input (neither positionally nor as input=)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} got a {type(x).__name__} as its input, expected a torch.Tensor")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{where} got an input of shape {list(x.shape)}, but its in_features is {in_features}: the last "
            f"dimension of its inputs must be {in_features} (check the calibration batches); the model was not changed"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{where}: its inputs have NaN or infinite values (the first layer to be quantized that they reached "
            "in this batch); the model was not changed"
        )
    return x


def _second_moments(
    model: nn.Module, layers: dict[str, nn.Linear], calibration: Iterable[Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``XᵀX`` of each layer's inputs over the calibration batches (float64 accumulation), and the layers that no
    batch reached.

    The batches run under ``torch.no_grad()`` with every module's ``training`` flag set to ``False`` (BatchNorm
    statistics stay as they are, dropout is off); each flag is restored afterwards, also on an error. The flags are
    set directly, so no ``train()`` override of the model runs.

    Raises:
        TypeError: a layer was called without a tensor input.
        ValueError: a layer's inputs do not end in its ``in_features`` or are not finite (naming the layer and the
            batch), or their ``XᵀX`` overflowed.
    """
    moments = {
        path: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) for path, layer in layers.items()
    }
    seen: set[str] = set()
    batch_index = [0]

    def hook(path: str, in_features: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def accumulate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _calibration_input(path, in_features, batch_index[0], args, kwargs)
            x = x.detach().reshape(-1, in_features).to(torch.float64).cpu()
            moments[path] += x.T @ x
            seen.add(path)

        return accumulate

    modes = [(module, module.training) for module in model.modules()]
    handles = [
        layer.register_forward_pre_hook(hook(path, layer.in_features), with_kwargs=True)
        for path, layer in layers.items()
    ]
    try:
        for module, _ in modes:
            module.training = False
        with torch.no_grad():
            for index, batch in enumerate(calibration):
                batch_index[0] = index
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    overflowed = [path or "<root>" for path, moment in moments.items() if not bool(torch.isfinite(moment).all())]
    if overflowed:
        raise ValueError(
            "the second moments XᵀX of the calibration inputs overflowed (inputs too large) for these layers: "
            + ", ".join(overflowed)
            + "; the model was not changed"
        )
    return moments, [path for path in layers if path not in seen]


def quantize_weights_(
    model: nn.Module,
    config: ConfigLike | None = None,
    skip: SkipPattern | Iterable[SkipPattern] | None = None,
    *,
    calibration: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **encode_options: Any,
) -> nn.Module:
    """Encode every selected ``nn.Linear`` of a model with real weights as an ``aqlm.QuantizedLinear``, in place.

    Uses :func:`aqlm_ctx.encoding.encode_linear` (residual k-means, beam search, least-squares refits) without
    calibration data, or, with ``calibration``, minimising each layer's output error on those inputs. The same
    layers are selected as by :func:`aqlm_ctx.replace_linear_layers` (same skip semantics), each keeps its
    identity, and the result can be written with :func:`aqlm_ctx.save_checkpoint`.

    All or nothing: every layer is checked (and the calibration batches run) before any is encoded, and every
    layer is encoded before any is converted, so on an error the model is unchanged.

    Args:
        model: a model with real weights (on any device; encoding runs there).
        config: anything :func:`aqlm_ctx.as_config` accepts.
        skip: more skip patterns, applied together with the config's.
        calibration: batches to run through the model (a tensor, a tuple of positional arguments or a dict of
            keyword arguments each) to collect each layer's input second moments. They run in eval mode under
            ``torch.no_grad()``: every module's ``training`` flag is set to ``False`` meanwhile (BatchNorm running
            statistics are not updated, dropout is off) and restored afterwards. A layer that no batch reaches is
            encoded without calibration data, with a warning.
        generator: makes encoding reproducible (default: seeded with 0).
        progress: show a progress bar on stderr.
        encode_options: ``rounds``, ``beam_size``, ``kmeans_iters``, ``sweeps`` for :func:`encode_linear`.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module, an encoding option is unknown, or a layer got no tensor input during
            calibration.
        ValueError: a selected layer is on meta (nothing to encode), not divisible by the group sizes or has NaN or
            infinite weights; a layer's calibration inputs have the wrong last dimension or NaN or infinite
            values; an encoding option is out of range. The error names the layer; the model is unchanged.

    Example:
        >>> config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
        >>> quantize_weights_(model, config, skip=["lm_head"])  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to quantize, got {type(model).__name__}")
    check_encode_options(**encode_options)
    aqlm_config = as_config(config).with_skip(skip)
    selected, indivisible = select_linear_layers(model, aqlm_config, "quantize_weights_")
    if indivisible:
        raise indivisible_layers_error(indivisible, aqlm_config, "; the model was not changed")
    targets = dict(selected)
    problems: list[str] = []
    for path, m in targets.items():
        if m.weight.is_meta:
            problems.append(f"{path or '<root>'}: its weight is on the meta device (load real weights first)")
        elif not bool(torch.isfinite(m.weight.detach()).all()):
            problems.append(
                f"{path or '<root>'}: its weight of shape {list(m.weight.shape)} has NaN or infinite values"
            )
    if problems:
        raise ValueError("cannot quantize these layers:\n  " + "\n  ".join(problems) + "\nthe model was not changed")
    moments: dict[str, torch.Tensor] = {}
    if calibration is not None:
        moments, unseen = _second_moments(model, targets, calibration)
        for path in unseen:
            del moments[path]  # encoded from the weights alone, not against a zero XᵀX
        if unseen:
            warnings.warn(
                f"quantize_weights_: no calibration batch reached these layers, encoded without calibration data: "
                f"{', '.join(path or '<root>' for path in unseen)}",
                UserWarning,
                stacklevel=2,
            )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    bar = _progress(len(targets), progress)
    templates = []
    for path, linear in targets.items():  # encode every layer first: an error leaves the model untouched
        stats = moments.get(path)
        weight = linear.weight.detach()
        try:
            encoded = encode_linear(
                weight,
                aqlm_config,
                input_stats=stats.to(weight.device) if stats is not None else None,
                generator=generator,
                **encode_options,
            )
        except (TypeError, ValueError) as error:
            kind = ValueError if isinstance(error, ValueError) else TypeError
            raise kind(f"{path or '<root>'}: {error}; the model was not changed") from error
        template = new_quantized_linear(
            linear.in_features, linear.out_features, linear.bias is not None, aqlm_config, weight.dtype
        )
        for name, value in zip(("codes", "codebooks", "scales"), encoded, strict=True):
            setattr(template, name, nn.Parameter(value, requires_grad=False))
        if linear.bias is not None:
            bias = linear.bias.detach().to(aqlm_config.dtype or linear.bias.dtype)
            template.bias = nn.Parameter(bias, requires_grad=False)
        templates.append(template)
        bar(path)
    make_all_quantized_in_place(zip(targets.values(), templates, strict=True))  # templates use aqlm_ctx's kernels
    logger.info("encoded %d Linear layers as %s", len(targets), aqlm_config.format_name)
    return model


def _progress(total: int, enabled: bool) -> Callable[[str], None]:
    """A progress reporter: tqdm when installed and enabled, else nothing."""
    if not enabled or total == 0:
        return lambda path: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda path: None
    bar = tqdm(total=total, desc="encoding", unit="layer", file=sys.stderr, leave=False)

    def advance(path: str) -> None:
        bar.set_postfix_str(path, refresh=False)
        bar.update()
        if bar.n >= total:
            bar.close()

    return advance

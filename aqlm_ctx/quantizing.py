"""``quantize_weights_``: encode the linear layers of a model with real weights into AQLM, in place."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .config import AqlmConfig, ConfigLike, SkipPattern, as_config
from .encoding import check_encode_options, encode_linear
from .layers import indivisible_layers_error, make_all_quantized_in_place, new_quantized_linear, shared_parameters
from .substitutions import SwappedModules
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


@torch.inference_mode(False)  # codes, codebooks and scales are ordinary tensors, also under inference_mode
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

    Like :func:`aqlm_ctx.replace_linear_layers`, it converts fused MoE experts (see :mod:`aqlm_ctx.substitutions`)
    per expert: the per-expert layers get the original weights, then are encoded like any other (or stay dense when
    skipped). Each distinct weight is encoded once (with calibration, against the summed ``XᵀX`` of the layers that
    hold it) and layers that share a weight share its codes, codebooks and scales; a bias tied to another module
    stays tied. The new tensors are ordinary ones, never inference tensors, also under ``torch.inference_mode()``.

    All or nothing: every layer is checked (and the calibration batches run) before any is encoded, and every
    layer is encoded before any is converted, so on an error (or an interrupt) the model is unchanged, the
    substituted experts swapped back.

    Args:
        model: a model with real weights (on any device; encoding runs there).
        config: anything :func:`aqlm_ctx.as_config` accepts.
        skip: more skip patterns, applied together with the config's.
        calibration: batches to run through the model (a tensor, a tuple of positional arguments or a dict of
            keyword arguments each) to collect each layer's input second moments. They run in eval mode under
            ``torch.no_grad()``: every module's ``training`` flag is set to ``False`` meanwhile (BatchNorm running
            statistics are not updated, dropout is off) and restored afterwards. A weight that no batch reaches is
            encoded without calibration data, with a warning.
        generator: makes encoding reproducible (default: seeded with 0).
        progress: show a progress bar on stderr.
        encode_options: ``rounds``, ``beam_size``, ``kmeans_iters``, ``sweeps`` for :func:`encode_linear`.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module, an encoding option is unknown, or a layer got no tensor input during
            calibration.
        ValueError: a selected layer is on meta (nothing to encode), not divisible by the group sizes, or has NaN,
            infinite or too large weights (beyond what the encoder's float32 arithmetic holds); a layer's
            calibration inputs have the wrong last dimension or NaN or infinite values; an encoding option is out
            of range; a substituted module has real weights but its substitution no ``fill``. The error names the
            layer; the model is unchanged.

    Example:
        >>> config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
        >>> quantize_weights_(model, config, skip=["lm_head"])  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to quantize, got {type(model).__name__}")
    check_encode_options(**encode_options)
    aqlm_config = as_config(config).with_skip(skip)
    swaps = SwappedModules(model)
    try:
        unfillable = swaps.unfillable(model, "", lambda replacement: True)  # every layer is encoded from weights
        if unfillable:
            raise ValueError(
                "these substituted modules have real weights, but their substitution has no fill to give their "
                f"layers the original weights (the model was not changed): {', '.join(unfillable)}"
            )
        swaps.fill()
        unreached = _encode_in_place(model, aqlm_config, calibration, generator, progress, encode_options)
    except BaseException:  # all or nothing: the substituted modules back (no layer was converted)
        swaps.undo()
        raise
    if unreached:
        warnings.warn(
            f"quantize_weights_: no calibration batch reached these layers, encoded without calibration data: "
            f"{', '.join(path or '<root>' for path in unreached)}",
            UserWarning,
            stacklevel=3,  # past torch's inference_mode wrapper: the caller's line
        )
    return model


def _weight_problem(path: str, weight: torch.Tensor, config: AqlmConfig) -> str | None:
    """Why the encoder cannot take this weight (on meta, not finite, too large), if it cannot."""
    where = f"{path or '<root>'}: its weight"
    if weight.is_meta:
        return f"{where} is on the meta device (load real weights first)"
    if not bool(torch.isfinite(weight).all()):
        return f"{where} of shape {list(weight.shape)} has NaN or infinite values"
    if weight.numel() == 0:
        return None  # encode_linear refuses the empty shape
    # The encoder sums the squares of each output group's out_group_size * in_features weights in float32.
    limit = (torch.finfo(torch.float32).max / (config.out_group_size * weight.shape[1])) ** 0.5
    largest = float(torch.linalg.vector_norm(weight, ord=float("inf")))
    if largest >= limit:
        return (
            f"{where} of shape {list(weight.shape)} has values up to {largest:.3g} in magnitude, out of range for "
            f"the encoder (below {limit:.3g} for this shape: it squares them in float32)"
        )
    return None


def _encode_in_place(
    model: nn.Module,
    config: AqlmConfig,
    calibration: Iterable[Any] | None,
    generator: torch.Generator | None,
    progress: bool,
    encode_options: dict[str, Any],
) -> list[str]:
    """Check, encode and convert the selected layers (see :func:`quantize_weights_`); all or nothing.

    Returns:
        The paths of the layers encoded without calibration data although ``calibration`` was given.
    """
    selected, indivisible = select_linear_layers(model, config, "quantize_weights_")
    if indivisible:
        raise indivisible_layers_error(indivisible, config, "; the model was not changed")
    targets = dict(selected)
    problems = [problem for path, m in targets.items() if (problem := _weight_problem(path, m.weight.detach(), config))]
    if problems:
        raise ValueError("cannot quantize these layers:\n  " + "\n  ".join(problems) + "\nthe model was not changed")
    holders: dict[int, list[str]] = {}  # the paths of the layers that hold each distinct weight
    for path, linear in targets.items():
        holders.setdefault(id(linear.weight), []).append(path)
    moments: dict[str, torch.Tensor] = {}
    unreached: list[str] = []
    if calibration is not None:
        moments, unseen = _second_moments(model, targets, calibration)
        for path in unseen:
            del moments[path]  # encoded from the weights alone, not against a zero XᵀX
        unreached = [path for paths in holders.values() if not any(p in moments for p in paths) for path in paths]
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    bar = _progress(len(holders), progress)
    encoded: dict[int, list[nn.Parameter]] = {}
    for key, paths in holders.items():  # encode every weight first: an error leaves the model untouched
        reached = [moments[path] for path in paths if path in moments]
        weight = targets[paths[0]].weight.detach()
        try:
            tensors = encode_linear(
                weight,
                config,
                input_stats=torch.stack(reached).sum(0).to(weight.device) if reached else None,
                generator=generator,
                **encode_options,
            )
        except (TypeError, ValueError) as error:
            kind = ValueError if isinstance(error, ValueError) else TypeError
            raise kind(f"{paths[0] or '<root>'}: {error}; the model was not changed") from error
        encoded[key] = [nn.Parameter(value, requires_grad=False) for value in tensors]
        bar(paths[0])
    shared = shared_parameters(model)
    biases: dict[int, nn.Parameter] = {}
    templates = []
    for linear in targets.values():
        template = new_quantized_linear(
            linear.in_features, linear.out_features, linear.bias is not None, config, linear.weight.dtype
        )
        for name, parameter in zip(("codes", "codebooks", "scales"), encoded[id(linear.weight)], strict=True):
            template._parameters[name] = parameter  # layers that share one weight share these
        bias = linear.bias
        if bias is not None:
            dtype = config.dtype or bias.dtype
            if id(bias) not in biases:
                tied = id(bias) in shared and bias.dtype == dtype  # BERT's decoder bias stays tied to its owner
                biases[id(bias)] = bias if tied else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
            template._parameters["bias"] = biases[id(bias)]
        templates.append(template)
    make_all_quantized_in_place(zip(targets.values(), templates, strict=True))  # templates use aqlm_ctx's kernels
    logger.info("encoded %d Linear layers (%d distinct weights) as %s", len(targets), len(holders), config.format_name)
    return unreached


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

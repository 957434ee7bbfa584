"""``quantize_weights_``: encode the linear layers of a model with real weights into AQLM, in place."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .config import ConfigLike, SkipPattern, as_config
from .encoding import encode_linear
from .layers import make_quantized_in_place, new_quantized_linear
from .visitor import select_linear_layers

__all__ = ["quantize_weights_"]

logger = logging.getLogger(__name__)


def _second_moments(
    model: nn.Module, layers: dict[str, nn.Linear], calibration: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """``XᵀX`` of each layer's inputs over the calibration batches (float64 accumulation)."""
    moments = {
        path: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) for path, layer in layers.items()
    }

    def hook(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def accumulate(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64).cpu()
            moments[path] += x.T @ x

        return accumulate

    handles = [layer.register_forward_pre_hook(hook(path)) for path, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in calibration:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return moments


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

    Args:
        model: a model with real weights (on any device; encoding runs there).
        config: anything :func:`aqlm_ctx.as_config` accepts.
        skip: more skip patterns, applied together with the config's.
        calibration: batches to run through the model (a tensor, a tuple of positional arguments or a dict of
            keyword arguments each) to collect each layer's input second moments.
        generator: makes encoding reproducible (default: seeded with 0).
        progress: show a progress bar on stderr.
        encode_options: ``rounds``, ``beam_size``, ``kmeans_iters``, ``sweeps`` for :func:`encode_linear`.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: a selected layer is on meta (nothing to encode) or not divisible by the group sizes; the
            model is unchanged.

    Example:
        >>> config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
        >>> quantize_weights_(model, config, skip=["lm_head"])  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to quantize, got {type(model).__name__}")
    aqlm_config = as_config(config).with_skip(skip)
    selected, problems = select_linear_layers(model, aqlm_config, "quantize_weights_")
    targets = dict(selected)
    problems += [
        f"{path}: its weight is on the meta device (load real weights first)"
        for path, m in targets.items()
        if m.weight.is_meta
    ]
    if problems:
        raise ValueError("cannot quantize these layers:\n  " + "\n  ".join(problems) + "\nthe model was not changed")
    moments = _second_moments(model, targets, calibration) if calibration is not None else {}
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    bar = _progress(len(targets), progress)
    for path, linear in targets.items():
        stats = moments.get(path)
        weight = linear.weight.detach()
        encoded = encode_linear(
            weight,
            aqlm_config,
            input_stats=stats.to(weight.device) if stats is not None else None,
            generator=generator,
            **encode_options,
        )
        template = new_quantized_linear(
            linear.in_features, linear.out_features, linear.bias is not None, aqlm_config, weight.dtype
        )
        for name, value in zip(("codes", "codebooks", "scales"), encoded, strict=True):
            setattr(template, name, nn.Parameter(value, requires_grad=False))
        if linear.bias is not None:
            bias = linear.bias.detach().to(aqlm_config.dtype or linear.bias.dtype)
            template.bias = nn.Parameter(bias, requires_grad=False)
        make_quantized_in_place(linear, template)  # the template is wired to aqlm_ctx's kernels
        bar(path)
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

"""Loading HF-format AQLM checkpoints into skeletons built by aqlm_ctx, for transformers and any other model."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from aqlm import QuantizedLinear
from torch import nn

from .checkpoint import MappingReader, TensorReader, find_checkpoint_files, open_checkpoint
from .config import AqlmConfig, parse_float_dtype, read_checkpoint_config
from .construction import aqlm_quantized
from .kernels import install_kernels
from .layers import (
    check_divisible,
    layer_config,
    make_all_quantized_in_place,
    new_quantized_linear,
    strip_foreign_parameters,
)
from .substitutions import apply_renames, checkpoint_renames, renamed_skip

__all__ = ["from_pretrained", "load_checkpoint", "load_tensors"]

logger = logging.getLogger(__name__)

DeviceLike = str | int | torch.device
DeviceMap = str | Mapping[str, DeviceLike]
_MAX_LISTED = 20


def _listing(items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "\n  " + "\n  ".join(shown) + more


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The ``dtype`` argument of the loaders: a floating dtype or its name; ``None`` and ``"auto"`` mean "as is"."""
    return None if dtype == "auto" else parse_float_dtype(dtype, "dtype")


@dataclass
class _Slot:
    """One tensor of the model, possibly reachable under several names (tied parameters)."""

    names: list[str]
    tensor: torch.Tensor
    is_parameter: bool
    persistent: bool = True
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)


def _slots(model: nn.Module) -> dict[int, _Slot]:
    slots: dict[int, _Slot] = {}
    for module_path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_path}." if module_path else ""
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in tensors.items():
                if tensor is None:
                    continue
                slot = slots.setdefault(id(tensor), _Slot([], tensor, kind == "parameter"))
                if prefix + name not in slot.names:
                    slot.names.append(prefix + name)
                    slot.owners.append((module, name))
                if kind == "buffer" and name in module._non_persistent_buffers_set:
                    slot.persistent = False
    return slots


def _model_names(stored: list[str], renames: list[tuple[str, str]], problems: list[str]) -> dict[str, str]:
    """Map the model's tensor names to the checkpoint's, through the renames that the model's modules declare."""
    by_model_name: dict[str, str] = {}
    for name in stored:
        renamed = apply_renames(name, renames)
        if renamed in by_model_name:
            problems.append(f"{name} and {by_model_name[renamed]} both map to the model's {renamed}")
        by_model_name[renamed] = name
    return by_model_name


def _linear_subclasses(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Layers of a subclass of ``nn.Linear`` (Falcon's ``FalconLinear``), which aqlm_quantized leaves dense."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear
    ]


def _quantize_stored_linear_subclasses(
    model: nn.Module, directory: Path, config: AqlmConfig, allow_pickle: bool
) -> None:
    """Turn the ``nn.Linear`` subclasses the checkpoint holds codes for into ``QuantizedLinear`` (in place, on meta):
    transformers' integration quantizes every ``isinstance(m, nn.Linear)``."""
    subclasses = _linear_subclasses(model)
    if not subclasses:  # the usual case: no need to list the checkpoint's tensors
        return
    stored = find_checkpoint_files(directory, allow_pickle=allow_pickle).weight_map
    names = set(_model_names(list(stored), checkpoint_renames(model), []))
    make_all_quantized_in_place(
        (
            module,
            new_quantized_linear(
                module.in_features, module.out_features, module.bias is not None, config, module.weight.dtype
            ),
        )
        for path, module in subclasses
        if f"{path}.codes" in names and check_divisible(module.in_features, module.out_features, config, path) is None
    )


def _check_quantized_layers(model: nn.Module, checkpoint_config: AqlmConfig | None) -> list[str]:
    problems = []
    for path, layer in model.named_modules():
        if not isinstance(layer, QuantizedLinear) or checkpoint_config is None:
            continue
        ours = layer_config(layer)
        if not ours.same_format(checkpoint_config):
            problems.append(
                f"{path}: the model's layer is {ours.format_name} but the checkpoint was quantized with "
                f"{checkpoint_config.format_name} (in_group_size, out_group_size, num_codebooks, nbits_per_codebook "
                "must all agree)"
            )
    return problems


def _tensor_problems(
    slot: _Slot, source: str, reader: TensorReader | MappingReader, modules: Mapping[str, nn.Module]
) -> list[str]:
    stored_dtype, stored_shape = reader.dtype_and_shape(source)
    expected = slot.tensor
    problems = []
    if stored_shape != tuple(expected.shape):
        problems.append(
            f"{source}: shape {list(stored_shape)} in the checkpoint, the model expects {list(expected.shape)}"
        )
    module_path, _, name = slot.names[0].rpartition(".")
    owner = modules[module_path]
    if isinstance(owner, QuantizedLinear) and name == "codes":
        wanted = layer_config(owner).code_dtype
        if stored_dtype != wanted:
            problems.append(
                f"{source}: codes are {stored_dtype} in the checkpoint, but nbits_per_codebook="
                f"{owner.nbits_per_codebook} needs {wanted}; the checkpoint was quantized with a different config"
            )
    elif expected.is_floating_point() != stored_dtype.is_floating_point:
        problems.append(f"{source}: dtype {stored_dtype} in the checkpoint, the model expects {expected.dtype}")
    return problems


def _module_devices(model: nn.Module, device_map: Mapping[str, DeviceLike]) -> Callable[[str], torch.device]:
    on_disk = sorted(name or "<root>" for name, device in device_map.items() if device == "disk")
    if on_disk:
        raise ValueError(
            f"device_map puts {', '.join(on_disk)} on 'disk', which aqlm_ctx does not support: give the model more "
            "max_memory, or place those modules on 'cpu'"
        )
    resolved = {
        name: torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        for name, device in device_map.items()
    }

    def device_of(tensor_name: str) -> torch.device:
        parts = tensor_name.split(".")
        for end in range(len(parts), -1, -1):
            prefix = ".".join(parts[:end])
            if prefix in resolved:
                return resolved[prefix]
        raise ValueError(f"device_map places no module that contains {tensor_name!r}")

    return device_of


_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def _one_device_as_map(device_map: Any) -> Any:
    """A ``device_map`` that names one device (``0``, ``"cuda:1"``, ``torch.device("cpu")``) as ``{"": device}``,
    as transformers takes it; placements and dicts as they are.

    Raises:
        TypeError: neither a placement name, a device nor a mapping.
    """
    if device_map is None or isinstance(device_map, Mapping) or device_map in _PLACEMENTS:
        return device_map
    if isinstance(device_map, (int, torch.device)) and not isinstance(device_map, bool):
        return {"": device_map}  # a GPU index stays an index, as in a dict (accelerate's form)
    if isinstance(device_map, str):
        try:
            device = torch.device(device_map)
        except RuntimeError:
            return device_map  # not a device name either: _infer_device_map names what is allowed
        if device.type == "meta":
            raise ValueError("device_map='meta' would leave the model without weights: name a real device")
        return {"": device}
    raise TypeError(
        f"device_map must be one of {', '.join(map(repr, _PLACEMENTS))}, a device (0, 'cuda:1', torch.device) or a "
        f"dict of module name to device, got {device_map!r} ({type(device_map).__name__})"
    )


def _infer_device_map(
    model: nn.Module, device_map: str, max_memory: Mapping[Any, Any] | None, dtype: torch.dtype | None
) -> dict[str, DeviceLike]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if device_map not in _PLACEMENTS:
        raise ValueError(
            f"device_map must be one of {', '.join(map(repr, _PLACEMENTS))}, a device or a dict, got {device_map!r}"
        )
    no_split = getattr(model, "_no_split_modules", None) or []
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    return dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype))


def _converted(slot: _Slot, value: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``value`` on ``device``; a floating one in ``dtype``, else the skeleton's dtype."""
    return value.to(device, dtype or slot.tensor.dtype) if value.is_floating_point() else value.to(device)


def _assign(slot: _Slot, value: torch.Tensor) -> None:
    new = nn.Parameter(value, requires_grad=slot.tensor.requires_grad) if slot.is_parameter else value
    for module, name in slot.owners:
        if slot.is_parameter:
            module._parameters[name] = new  # type: ignore[assignment]
        else:
            module._buffers[name] = new


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


def _recompute_transformers_buffers(
    model: nn.Module, slots: list[_Slot], device_of: Callable[[str], torch.device]
) -> list[_Slot]:
    """Let transformers recompute meta non-persistent buffers (rotary ``inv_freq``, ``position_ids``, ...).

    Uses the model's own ``_init_weights`` on the modules that own such buffers, as transformers' loader does.
    While it runs, every parameter and every other buffer of those modules and their submodules is swapped for a
    meta stand-in (CLIP's ``_init_weights`` on its embeddings module also draws the embeddings it holds), so nothing
    loaded is touched. Returns the slots it did not recompute (left on meta).
    """
    owners = {id(module): module for slot in slots for module, _ in slot.owners}
    recomputed = {(id(module), name) for slot in slots for module, name in slot.owners}
    placed: dict[int, tuple[torch.Tensor, int]] = {}
    for slot in slots:
        value = torch.empty_like(slot.tensor, device=device_of(slot.names[0]))
        _assign(slot, value)
        placed[id(slot)] = (value, value._version)
    for module in owners.values():
        loaded: list[tuple[dict[str, Any], str, torch.Tensor]] = []
        for submodule in module.modules():
            for name, param in submodule._parameters.items():
                if param is not None:
                    loaded.append((submodule._parameters, name, param))
                    submodule._parameters[name] = nn.Parameter(
                        torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                    )
            for name, buffer in submodule._buffers.items():
                if buffer is not None and (id(submodule), name) not in recomputed:
                    loaded.append((submodule._buffers, name, buffer))
                    submodule._buffers[name] = torch.empty_like(buffer, device="meta")
        try:
            model._init_weights(module)  # type: ignore[operator]
        finally:
            for container, name, tensor in loaded:
                container[name] = tensor
    still = []
    for slot in slots:  # written in place (a version bump) or replaced: recomputed; else back to meta
        module, name = slot.owners[0]
        value, version = placed[id(slot)]
        if module._buffers.get(name) is value and value._version == version:
            _assign(slot, slot.tensor)
            still.append(slot)
    return still


# Divides every layer, and its codebooks are tiny: for rebuilding a model only for its buffers.
_ANY_LAYER = AqlmConfig(in_group_size=1, out_group_size=1, num_codebooks=1, nbits_per_codebook=1)


def _transformers_rebuild(model: nn.Module) -> Callable[[], nn.Module]:
    """Builds the same transformers model again with real buffers (linear layers stay empty, on meta)."""

    def rebuild() -> nn.Module:
        with aqlm_quantized(_ANY_LAYER, init_on_meta=False):
            return type(model)._from_config(model.config)  # type: ignore[attr-defined]

    return rebuild


def _tie_weights(model: nn.Module) -> None:
    """transformers' ``tie_weights``, with the mapping computed at construction (when every layer had a weight).

    Recomputing it now fails for a quantized tie target, which has no ``weight`` to match.
    """
    tie: Callable[..., Any] = model.tie_weights  # type: ignore[assignment]
    if "recompute_mapping" not in inspect.signature(tie).parameters:
        tie()  # transformers 4
        return
    mapping = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(mapping, dict):
        tie(recompute_mapping=False)
        return

    def quantized_owner(name: str) -> bool:
        try:
            return isinstance(model.get_submodule(name.rpartition(".")[0]), QuantizedLinear)
        except AttributeError:
            return False

    # A quantized layer has no weight to tie to or from (a layer shared by several paths already shares its codes).
    kept = {t: s for t, s in mapping.items() if not quantized_owner(t) and not quantized_owner(s)}
    setattr(model, "all_tied_weights_keys", kept)  # noqa: B010 - a plain attribute transformers sets
    try:
        tie(recompute_mapping=False)
    finally:
        setattr(model, "all_tied_weights_keys", mapping)  # noqa: B010


def _recompute_by_rebuilding(
    slots: list[_Slot],
    rebuild: Callable[[], nn.Module],
    device_of: Callable[[str], torch.device],
    dtype: torch.dtype | None,
) -> list[_Slot]:
    """Take meta non-persistent buffers from a second build whose tensors are real, floating ones in ``dtype`` (else
    the skeleton's), as loaded tensors are; return those still missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warnings were given by the first build
        fresh = dict(rebuild().named_buffers(remove_duplicate=False))
    still = []
    for slot in slots:
        value = fresh.get(slot.names[0])
        if value is None or value.device.type == "meta":
            still.append(slot)
        else:
            _assign(slot, _converted(slot, value, dtype, device_of(slot.names[0])))
    return still


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    device: DeviceLike | None = None,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    rebuild: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Load an HF-format AQLM checkpoint into a skeleton built by aqlm_ctx (or any model with matching names).

    Tensors are read with safetensors (memory-mapped, no pickle) and *replace* the model's (meta) tensors on their
    target device; tied parameters stay tied. Afterwards every QuantizedLinear runs through aqlm_ctx's kernels (its
    cached kernel choice is reset), transformers models are tied and get their non-persistent buffers recomputed,
    and the model is in eval mode.

    Args:
        model: the skeleton, e.g. built under :class:`aqlm_ctx.aqlm_quantized`.
        path: the checkpoint directory (``model.safetensors`` or shards with ``model.safetensors.index.json``).
        device: put everything on this device (default ``"cpu"``).
        device_map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a dict of module name to
            device, to spread layers over several GPUs and the CPU (accelerate's placement and hooks); one device
            (``0``, ``"cuda:1"``, ``torch.device``) means ``{"": device}``.
        max_memory: per-device memory limits for ``device_map`` (implies ``"auto"`` when given alone).
        dtype: dtype of floating tensors (codebooks, scales, biases, dense layers); default: the skeleton's.
        strict: unexpected tensors in the checkpoint are an error (else a warning); missing ones always are.
        allow_pickle: read ``pytorch_model.bin`` files (with ``torch.load(weights_only=True)``) if no safetensors.
        rebuild: builds the model again with real non-persistent buffers, for models that are not transformers
            models and whose buffers were built on meta (``from_pretrained`` passes it).

    Returns:
        ``model``, loaded.

    Raises:
        FileNotFoundError: no checkpoint directory or no weights in it.
        ValueError: missing, unexpected (strict), misshapen or wrongly typed tensors; a checkpoint quantized with a
            different config; corrupt files; pickle files without ``allow_pickle``; tensors left on meta.

    Example:
        >>> with aqlm_quantized(AqlmConfig.from_pretrained(path)):
        ...     model = MyLM(args)  # doctest: +SKIP
        >>> load_checkpoint(model, path, device="cpu")  # doctest: +SKIP
    """
    files = find_checkpoint_files(path, allow_pickle=allow_pickle)
    try:
        checkpoint_config: AqlmConfig | None = AqlmConfig.from_dict(read_checkpoint_config(path)[1])
    except FileNotFoundError:
        checkpoint_config = None
    with open_checkpoint(files) as reader:
        return _load(
            model, reader, os.fspath(path), checkpoint_config, device, device_map, max_memory, dtype, strict, rebuild
        )


def load_tensors(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    device: DeviceLike | None = None,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Like :func:`load_checkpoint`, from an in-memory mapping of checkpoint names to tensors.

    Example:
        >>> load_tensors(model, aqlm_ctx.testing.random_tensors(model))  # doctest: +SKIP
    """
    return _load(model, MappingReader(tensors), "tensors", None, device, device_map, max_memory, dtype, strict, None)


def check_checkpoint(
    model: nn.Module,
    reader: TensorReader | MappingReader,
    source_name: str,
    checkpoint_config: AqlmConfig | None,
    strict: bool = True,
    slots: list[_Slot] | None = None,
) -> tuple[dict[int, str], list[str]]:
    """Check that the tensors ``reader`` holds fit ``model`` (names, shapes, code dtypes, the quantized layers'
    format) without reading their data.

    Returns:
        The checkpoint name of each slot's tensor, and the checkpoint's tensors the model has no place for (an
        error with ``strict``).

    Raises:
        ValueError: the problems, one per line: missing tensors, unexpected ones (with ``strict``), mismatches.
    """
    slots = slots if slots is not None else list(_slots(model).values())
    problems = _check_quantized_layers(model, checkpoint_config)
    modules = dict(model.named_modules(remove_duplicate=False))
    stored = _model_names(reader.names(), checkpoint_renames(model), problems)
    names = set(stored)
    sources: dict[int, str] = {}
    missing: list[str] = []
    for slot in slots:
        present = [name for name in slot.names if name in names]
        if present:
            sources[id(slot)] = stored[present[0]]
            problems += _tensor_problems(slot, stored[present[0]], reader, modules)
        elif slot.persistent:  # also a real tensor: it would keep its initial values unnoticed
            missing.append(" = ".join(slot.names))
    unexpected = sorted(stored[name] for name in names - {name for slot in slots for name in slot.names})
    if missing:
        stored_dense = sorted(
            {name.rsplit(".", 1)[0] for name in missing if name.endswith(".codes") and name[:-6] + ".weight" in names}
        )
        hint = f" ({', '.join(stored_dense)} stored dense in the checkpoint: add to skip)" if stored_dense else ""
        subclasses = [(path, module) for path, module in _linear_subclasses(model) if f"{path}.codes" in names]
        if subclasses:
            hint += (
                f" ({', '.join(f'{path} ({type(module).__name__})' for path, module in subclasses)}: subclasses of "
                "nn.Linear, which aqlm_quantized leaves dense, hold codes in the checkpoint (transformers quantizes "
                "them); from_pretrained quantizes such layers)"
            )
        problems.append(f"missing from the checkpoint{hint}:" + _listing(missing))
    if unexpected and strict:
        problems.append("unexpected in the checkpoint (pass strict=False to ignore):" + _listing(unexpected))
    if problems:
        raise ValueError(f"cannot load {source_name} into {type(model).__name__}:" + _listing(problems))
    return sources, unexpected


@torch.inference_mode(False)  # loaded tensors are ordinary ones (version counters), also under inference_mode
def _load(
    model: nn.Module,
    reader: TensorReader | MappingReader,
    source_name: str,
    checkpoint_config: AqlmConfig | None,
    device: DeviceLike | None,
    device_map: DeviceMap | None,
    max_memory: Mapping[Any, Any] | None,
    dtype: torch.dtype | str | None,
    strict: bool,
    rebuild: Callable[[], nn.Module] | None,
) -> nn.Module:
    if device is not None and (device_map is not None or max_memory is not None):
        raise ValueError("pass either device or device_map/max_memory, not both")
    target_dtype = _parse_dtype(dtype)
    slots = list(_slots(model).values())
    sources, unexpected = check_checkpoint(model, reader, source_name, checkpoint_config, strict, slots)
    if unexpected:
        logger.warning("ignored %d unexpected tensors in %s:%s", len(unexpected), source_name, _listing(unexpected))

    if device_map is None and max_memory is not None:
        device_map = "auto"
    device_map = _one_device_as_map(device_map)
    if isinstance(device_map, str):
        device_map = _infer_device_map(model, device_map, max_memory, target_dtype)
    if device_map is not None:
        device_of = _module_devices(model, device_map)
    else:
        single = torch.device(device if device is not None else "cpu")
        device_of = lambda name: single  # noqa: E731

    for slot in slots:
        source = sources.get(id(slot))
        if source is None:
            continue
        _assign(slot, _converted(slot, reader.read(source), target_dtype, device_of(slot.names[0])))

    unloaded = [s for s in slots if id(s) not in sources and s.tensor.device.type == "meta"]
    _finish(model, unloaded, device_of, rebuild, target_dtype)
    if device_map is not None and len({str(d) for d in device_map.values()}) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=dict(device_map))
    logger.info("loaded %d tensors from %s", len(sources), source_name)
    return model


def _finish(
    model: nn.Module,
    unloaded: list[_Slot],
    device_of: Callable[[str], torch.device],
    rebuild: Callable[[], nn.Module] | None,
    dtype: torch.dtype | None,
) -> None:
    """Recompute buffers the checkpoint does not hold, tie, wire kernels, and make sure nothing stays on meta."""
    if unloaded and _is_transformers_model(model):
        unloaded = _recompute_transformers_buffers(model, unloaded, device_of)
        if rebuild is None:
            rebuild = _transformers_rebuild(model)
    if unloaded and rebuild is not None:
        unloaded = _recompute_by_rebuilding(unloaded, rebuild, device_of, dtype)
    if _is_transformers_model(model):
        _tie_weights(model)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            strip_foreign_parameters(module)  # tie_weights must not give a quantized lm_head a weight
            install_kernels(module)
    left = [
        name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.device.type == "meta"
    ]
    if left:
        raise ValueError(
            "these tensors are still on the meta device after loading (not in the checkpoint and not recomputable); "
            "build the skeleton with aqlm_quantized(..., init_on_meta=False), register such buffers as persistent, "
            "or use from_pretrained(path, model_fn=...):" + _listing(left)
        )
    model.eval()


def _checkpoint_dtype(model_config: Mapping[str, Any]) -> torch.dtype | None:
    # transformers 4 writes torch_dtype, transformers 5 dtype; where both are there, torch_dtype is what the
    # checkpoint's writer meant (earlier aqlm_ctx saves wrote the model's dtype there beside a stale dtype).
    for key in ("torch_dtype", "dtype"):
        name = model_config.get(key)
        if isinstance(name, str) and name != "auto":
            return parse_float_dtype(name, f"config.json {key}")
    return None


def _build_with_renamed_skips(
    build: Callable[[AqlmConfig], nn.Module], config: AqlmConfig
) -> tuple[nn.Module, AqlmConfig]:
    """Build with the checkpoint's skip list, and again with it renamed if the model's modules declare checkpoint
    renames (hub skip lists name checkpoint tensors, e.g. Mixtral's ``block_sparse_moe``, which the module that
    stands in for it is not called). Returns the model and the config it was built with.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build(config)
    skip = renamed_skip(config.skip, model)
    if skip == config.skip:
        for warning in caught:  # the build stands: its warnings are the user's
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return model, config
    renamed = config.replace(skip=skip)
    return build(renamed), renamed


def _build_transformers_model(
    path: Path, model_config: Mapping[str, Any], config: AqlmConfig, dtype: torch.dtype
) -> nn.Module:
    import transformers

    architectures = model_config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if not architectures:
        raise ValueError(
            f"{path}/config.json names no architecture (no 'architectures' field, as for a model of your own); "
            "pass model_fn= to build the model yourself"
        )
    if model_class is None:
        raise ValueError(
            f"{path}/config.json names architecture {architectures}, which this transformers "
            f"({transformers.__version__}) does not export; pass model_fn= to build the model yourself "
            "(checkpoint code is never executed: no trust_remote_code)"
        )
    data = dict(model_config)
    model_type = str(data.get("model_type", ""))
    if model_type.endswith("_aqlm"):  # legacy checkpoints: model_type "llama_aqlm" with a top-level "aqlm" block
        data["model_type"] = model_type.removesuffix("_aqlm")
        data.pop("aqlm", None)
        data.pop("auto_map", None)
    data.pop("quantization_config", None)
    hf_config = transformers.AutoConfig.for_model(**data)

    def build(config: AqlmConfig) -> nn.Module:
        with aqlm_quantized(config):
            return model_class._from_config(hf_config, dtype=dtype)

    model, _ = _build_with_renamed_skips(build, config)
    generation = path / "generation_config.json"
    if generation.is_file() and hasattr(model, "generation_config"):
        setattr(model, "generation_config", transformers.GenerationConfig.from_pretrained(path))  # noqa: B010
    return model


def from_pretrained(
    path: str | os.PathLike[str],
    model_fn: Callable[[], nn.Module] | None = None,
    **load_kwargs: Any,
) -> nn.Module:
    """Build the skeleton of an AQLM checkpoint under :class:`aqlm_quantized` and load it.

    Reads ``config.json`` (its ``quantization_config``, or a legacy top-level ``"aqlm"`` block, and ``torch_dtype``),
    builds the model with ``model_fn`` or else the transformers class the config names (never code from the
    checkpoint directory), honours the checkpoint's skip list in both forms (``lm_head.weight`` and ``lm_head``; renamed
    onto module paths where the model's modules declare checkpoint renames, as the stand-in for Mixtral's experts
    does), quantizes the subclasses of ``nn.Linear`` the checkpoint holds codes for (transformers' integration
    quantizes Falcon's ``FalconLinear``) and loads it with :func:`load_checkpoint`.

    Args:
        path: the checkpoint directory.
        model_fn: builds your own architecture (called with no arguments inside the block).
        load_kwargs: ``device``, ``device_map``, ``max_memory``, ``dtype`` (default: the checkpoint's
            ``torch_dtype``), ``strict``, ``allow_pickle``, as for :func:`load_checkpoint`.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_checkpoint`, and for a config that is not an AQLM checkpoint.

    Example:
        >>> model = from_pretrained("Llama-2-7b-AQLM-2Bit-1x16-hf", device="cuda")  # doctest: +SKIP
    """
    directory = Path(path)
    model_config, block = read_checkpoint_config(directory)
    config = AqlmConfig.from_dict(block)
    dtype = _parse_dtype(load_kwargs.pop("dtype", None)) or _checkpoint_dtype(model_config) or torch.float32
    # load_checkpoint's keyword arguments, less those from_pretrained passes itself; checked before the (slow) build.
    unknown = set(load_kwargs) - (set(inspect.signature(load_checkpoint).parameters) - {"model", "path", "rebuild"})
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if model_fn is None:
        model = _build_transformers_model(directory, model_config, config, dtype)
        rebuild = None
    else:

        def build(config: AqlmConfig, init_on_meta: bool = True) -> nn.Module:
            with aqlm_quantized(config, init_on_meta=init_on_meta):
                model = model_fn()
            if not isinstance(model, nn.Module):
                raise TypeError(f"model_fn returned {type(model).__name__}, not a torch.nn.Module")
            return model

        model, config = _build_with_renamed_skips(build, config)

        def rebuild() -> nn.Module:
            return build(config, init_on_meta=False)

    _quantize_stored_linear_subclasses(model, directory, config, bool(load_kwargs.get("allow_pickle", False)))
    return load_checkpoint(model, directory, dtype=dtype, rebuild=rebuild, **load_kwargs)

"""Writing models with ``aqlm.QuantizedLinear`` layers as HF-format AQLM checkpoints."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from aqlm import QuantizedLinear
from torch import nn

from .checkpoint import SAFETENSORS, SAFETENSORS_INDEX, write_safetensors
from .config import AqlmConfig
from .matching import GLOB_CHARACTERS

__all__ = ["save_checkpoint"]

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    count = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0
    if count <= 0:
        raise ValueError(f"max_shard_size must be a positive byte count or a size such as '5GB', got {size!r}")
    return count


def _model_format(model: nn.Module) -> AqlmConfig:
    formats = {
        (layer.in_group_size, layer.out_group_size, layer.num_codebooks, layer.nbits_per_codebook)
        for layer in model.modules()
        if isinstance(layer, QuantizedLinear)
    }
    if len(formats) != 1:
        found = "no QuantizedLinear layers" if not formats else f"several formats {sorted(formats)}"
        raise ValueError(f"save_checkpoint needs a model whose quantized layers share one format; it has {found}")
    return AqlmConfig(*formats.pop())


def _aqlm_kernel(layer: QuantizedLinear) -> str | None:
    """Which of aqlm's own kernels the layer cached on its first forward, if aqlm chose one.

    aqlm's ``prepare_matmul_op`` caches ``gemv_op``/``gemm_op`` classes built by ``_get_autograd_matmul_op``, whose
    ``forward`` closes over the kernel. Returns ``None`` when no aqlm op is cached (never run, or aqlm_ctx's own
    kernels installed), ``"numba"`` for the CPU kernel, ``"cuda"`` for the CUDA and Triton kernels, and the kernel's
    name (or ``"unknown"``) otherwise.
    """
    for op in (getattr(layer, "gemv_op", None), getattr(layer, "gemm_op", None)):
        if op is None or getattr(op, "__module__", None) != "aqlm.inference":
            continue
        try:
            kernel = inspect.getclosurevars(op.forward).nonlocals.get("forward_pass_kernel")
        except (AttributeError, TypeError):
            return "unknown"
        if isinstance(kernel, torch._ops.OpOverloadPacket) or getattr(kernel, "__module__", "").endswith(
            "triton_kernel"
        ):
            return "cuda"
        if getattr(kernel, "__module__", "").endswith("numba_kernel"):
            return "numba"
        return getattr(kernel, "__name__", None) or "unknown"
    return None


def _checkpoint_codes(name: str, layer: QuantizedLinear) -> torch.Tensor:
    """Codes in the checkpoint layout, undoing the in-place permutation aqlm's CPU kernel makes on first use.

    aqlm's first forward of an 8-bit layer on CPU permutes ``codes`` in place to ``[in_groups, out_groups, C]``.
    Where the two group counts differ the shape tells; where they are equal (square codes) the kernel aqlm cached
    tells: its CPU (numba) kernel reads the permuted layout, its CUDA kernels the checkpoint layout.

    Raises:
        ValueError: the codes are square and aqlm cached a kernel that runs on both CPU and CUDA (its generic
            dequantize kernel), so whether they were permuted cannot be told.
    """
    out_groups = layer.out_features // layer.out_group_size
    in_groups = layer.in_features // layer.in_group_size
    codes = layer.codes.data
    shape = tuple(codes.shape)
    if out_groups != in_groups:
        if shape == (in_groups, out_groups, layer.num_codebooks):
            codes = codes.permute(1, 0, 2)
        return codes.contiguous()
    if layer.codebook_size != 256:  # aqlm permutes only codes with 256-entry codebooks
        return codes.contiguous()
    kernel = _aqlm_kernel(layer)
    if kernel is None or kernel == "cuda":
        return codes.contiguous()
    if kernel == "numba":
        return codes.permute(1, 0, 2).contiguous()
    raise ValueError(
        f"cannot tell the layout of {name} {list(shape)}: aqlm's own kernel ({kernel}) has run on this layer, and "
        "aqlm permutes 8-bit codes in place to [in_groups, out_groups, codebooks] when its first forward gets a "
        "CPU input but not a CUDA one; with as many input as output groups the shape does not say which happened. "
        "Load the model with aqlm_ctx (from_pretrained / load_checkpoint, whose kernels never permute codes), or "
        "save before running it with aqlm's own kernels"
    )


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = {id(layer.codes): layer for layer in model.modules() if isinstance(layer, QuantizedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied parameter is stored once, under its first name
            continue
        seen.add(id(tensor))
        tensors[name] = _checkpoint_codes(name, layers[id(tensor)]) if id(tensor) in layers else tensor.data
    on_meta = [name for name, tensor in tensors.items() if tensor.device.type == "meta"]
    if on_meta:
        raise ValueError(
            "cannot save tensors that are on the meta device (load or encode the model first): "
            + ", ".join(on_meta[:10])
        )
    return tensors


def _skip_list(model: nn.Module) -> list[str]:
    """Every dense weight, by parameter name (transformers 4 matches these) and by module name (transformers 5).

    A module that holds quantized layers is left out (its name, in either form, would skip them too), and so is the
    root's own weight (it has no name); neither is a linear layer, which is what the list keeps dense. A module
    whose name, as a dot-aware suffix, would also skip a quantized layer (a dense top-level ``proj`` beside
    quantized ``blocks.0.proj``) is listed as an exact ``re:`` pattern instead.
    """
    reached_by_quantized: set[str] = set()  # every dot-suffix of every path of a quantized layer and its parents
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedLinear):
            parts = path.split(".")
            reached_by_quantized.update(
                ".".join(parts[start:end]) for end in range(1, len(parts) + 1) for start in range(end)
            )
    names = []
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if not path or isinstance(module, QuantizedLinear) or not isinstance(weight, torch.Tensor):
            continue
        if any(isinstance(inner, QuantizedLinear) for inner in module.modules()):
            continue
        if path in reached_by_quantized or GLOB_CHARACTERS.intersection(path):
            names.append("re:" + re.escape(path))
        else:
            names += [f"{path}.weight", path]
    return names


def _lossless_dtype(model: nn.Module) -> torch.dtype:
    """The ``torch_dtype`` to write: the dtype of the model's floating parameters, or where they have several
    (codebooks in ``AqlmConfig.dtype`` beside dense layers in another), one that holds each of them exactly:
    float64 if any is, else float32. ``from_pretrained`` loads the whole model in it by default."""
    dtypes = {param.dtype for param in model.parameters() if param.is_floating_point()}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _untie_quantized_output_embeddings(
    model: nn.Module, data: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """``tie_word_embeddings: false`` where the output embeddings are quantized: they hold codes, not the input
    embeddings' weight, and a reader that ties them (transformers does) would give a quantized layer a weight.
    transformers 5 then ties none of the model's declared pairs (BERT's ``decoder.bias`` to ``predictions.bias``
    too), so each pair's tensor, stored once, is also written under the name of the other."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if not isinstance(output, QuantizedLinear):
        return
    configs = [data, *(value for value in data.values() if isinstance(value, dict))]
    if not any(config.get("tie_word_embeddings") for config in configs):
        return
    for config in configs:
        if config.get("tie_word_embeddings"):
            config["tie_word_embeddings"] = False
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    state = model.state_dict(keep_vars=True)
    for target, source in tied.items() if isinstance(tied, Mapping) else ():
        for name, other in ((target, source), (source, target)):
            if name not in tensors and other in tensors and state.get(name) is state.get(other) is not None:
                tensors[name] = tensors[other].clone()


def _checkpoint_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint in ``directory``: ``model.safetensors``, shards named like
    ``model-00001-of-00002.safetensors``, the shard index and the ``.safetensors`` files it lists."""
    if not directory.is_dir():
        return []
    names = {
        entry.name
        for entry in directory.iterdir()
        if entry.name in (SAFETENSORS, SAFETENSORS_INDEX) or _SHARD.fullmatch(entry.name)
    }
    try:
        weight_map = json.loads((directory / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
        listed = [file for file in weight_map.values() if isinstance(file, str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = []
    names.update(file for file in listed if file.endswith(".safetensors") and Path(file).name == file)
    return [directory / name for name in sorted(names) if (directory / name).is_file()]


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    model_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``model`` as an HF-format AQLM checkpoint that :func:`aqlm_ctx.from_pretrained` and transformers read.

    Writes ``config.json`` (the transformers config for transformers models, else ``model_config``, with a
    ``quantization_config`` block whose ``linear_weights_not_to_quantize`` lists every dense weight both as
    ``lm_head.weight`` and as ``lm_head``, the forms transformers 4 and 5 match; one whose name, as a suffix, would
    also match quantized layers as the exact ``re:`` pattern only aqlm_ctx reads), ``generation_config.json`` for
    models that have one, and the tensors as ``model.safetensors`` or, above ``max_shard_size``, as shards with
    ``model.safetensors.index.json``. Tied parameters are stored once; codes are stored in the checkpoint layout even
    after CPU inference with aqlm's own kernels. A save followed by a load is bit-exact. ``torch_dtype`` is the
    dtype of the model's floating parameters; where they have several (``AqlmConfig.dtype`` codebooks beside
    dense layers in another dtype) it is one that holds all of them exactly (float32, or float64), and the model
    loads in it by default: the same values, in one dtype. Quantized output embeddings are written untied
    (``tie_word_embeddings: false``): they hold codes, not the input embeddings' weight.

    Every file is first written to a temporary folder inside ``path`` and then renamed into place, so a save that
    fails while writing (an error in the model's tensors, a full disk) leaves an existing checkpoint as it was; the
    renames themselves follow one another (weights, then configs), so a reader or a crash in between may see both.
    With ``overwrite`` the old checkpoint's weight files that the new one does not write (a single file replaced by
    shards, or the reverse) are removed afterwards; other files in ``path`` are never touched.

    Args:
        model: a model with real (not meta) tensors whose QuantizedLinear layers share one format.
        path: the directory to write (created if needed).
        max_shard_size: bytes per shard, as an int or a string such as ``"5GB"`` or ``"500MiB"``.
        model_config: config entries for models that are not transformers models (e.g. your own hyper-parameters).
        overwrite: replace an existing checkpoint in ``path``; without it an existing one is an error.

    Returns:
        The files written.

    Raises:
        FileExistsError: ``path`` already holds a file the save would replace or remove (``config.json``,
            ``generation_config.json``, weight files) and ``overwrite`` is false.
        ValueError: tensors are on meta, the quantized layers have several formats or none, adapters (peft LoRA) wrap
            quantized layers, bad ``max_shard_size``,
            or square 8-bit codes whose layout cannot be told after aqlm's own generic kernel ran on them.
    """
    directory = Path(path)
    limit = _parse_size(max_shard_size)
    adapters = [
        name for name, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), QuantizedLinear)
    ]
    if adapters:
        raise ValueError(
            f"{adapters[0]} (and {len(adapters) - 1} more) wraps a quantized layer in an adapter (peft): "
            "save_checkpoint writes base models; save the adapter with the peft model's save_pretrained, and the "
            "base model before adding adapters or after model.unload()"
        )
    config = _model_format(model)
    tensors = _tensors(model)
    generation = getattr(model, "generation_config", None)
    if generation is not None and not hasattr(generation, "save_pretrained"):
        generation = None
    stale = _checkpoint_weight_files(directory)
    if not overwrite:
        others = [_CONFIG, *([_GENERATION_CONFIG] if generation is not None else [])]
        existing = [file.name for file in stale] + [name for name in others if (directory / name).exists()]
        if existing:
            raise FileExistsError(
                f"{directory} already holds {', '.join(existing)}, which save_checkpoint would replace or remove; "
                "pass overwrite=True to replace the checkpoint"
            )
    hf_config = getattr(model, "config", None)
    data: dict[str, Any] = dict(hf_config.to_dict()) if hf_config is not None and hasattr(hf_config, "to_dict") else {}
    if hf_config is not None and not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    data.update(model_config or {})
    data.pop("quantization_config", None)
    data["torch_dtype"] = str(_lossless_dtype(model)).removeprefix("torch.")
    if hf_config is not None and "dtype" in data and "dtype" not in (model_config or {}):
        data["dtype"] = data["torch_dtype"]  # transformers 5's name for it (a key of its configs): both say the same
    _untie_quantized_output_embeddings(model, data, tensors)
    data["quantization_config"] = {
        "quant_method": "aqlm",
        "in_group_size": config.in_group_size,
        "out_group_size": config.out_group_size,
        "num_codebooks": config.num_codebooks,
        "nbits_per_codebook": config.nbits_per_codebook,
        "linear_weights_not_to_quantize": _skip_list(model),
    }
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".aqlm_ctx-save-", dir=directory))
    try:
        staged = write_safetensors(staging, tensors, limit, {"format": "pt"})
        if generation is not None:
            generation.save_pretrained(staging)
            staged.append(staging / _GENERATION_CONFIG)
        (staging / _CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
        staged.append(staging / _CONFIG)
        # Weights first, configs after them; each rename gives the file a new inode, so a model loaded from (and
        # still mapping) an old file is unaffected.
        files: list[Path] = []
        for file in staged:
            os.replace(file, directory / file.name)
            files.append(directory / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for file in stale:
        if file not in files:
            file.unlink(missing_ok=True)
    return files

"""The AQLM format of a model: a frozen, validated configuration.

An :class:`AqlmConfig` says how every quantized linear layer is stored (group sizes, number of codebooks, bits per
codebook), which dtype its codebooks and scales get, and which modules stay dense (``skip``). Every public function
of ``aqlm_ctx`` that takes a config also takes what :func:`as_config` understands: a hub ``quantization_config``
dict, a checkpoint directory or ``config.json`` path, or a ``transformers.AqlmConfig``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import nn

__all__ = ["AqlmConfig", "ConfigLike", "SkipPattern", "as_config", "read_checkpoint_config"]

SkipPattern: TypeAlias = "str | Callable[[str, nn.Module], bool]"
"""A module path pattern (see :mod:`aqlm_ctx.matching`) or a predicate ``(module_path, module) -> bool``."""

ConfigLike: TypeAlias = "AqlmConfig | Mapping[str, Any] | str | os.PathLike[str] | Any"
"""Anything :func:`as_config` turns into an :class:`AqlmConfig`."""

_FORMAT_FIELDS = ("in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook")
_SKIP_KEYS = ("linear_weights_not_to_quantize", "modules_to_not_convert", "skip")
_DICT_KEYS = frozenset({"quant_method", "dtype", *_FORMAT_FIELDS, *_SKIP_KEYS})


def _check_int(field: str, value: object, low: int, high: int | None = None) -> None:
    allowed = f"an int >= {low}" if high is None else f"an int in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"AqlmConfig.{field} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"AqlmConfig.{field} must be {allowed}, got {value}")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_float_dtype(value: object, name: str) -> torch.dtype | None:
    """A floating ``torch.dtype`` from a dtype or its name (``"float16"``, ``"torch.bfloat16"``); None stays None.

    Args:
        name: what the value is, for the error (``"AqlmConfig.dtype"``, ``"dtype"``).

    Raises:
        TypeError: neither a dtype, a string nor None.
        ValueError: an unknown name, or a dtype that is not floating.
    """
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name} must name a floating torch dtype such as 'float16', got {value!r}")
    else:
        raise TypeError(f"{name} must be a torch.dtype, a dtype name or None, got {value!r} ({type(value).__name__})")
    if dtype is not None and dtype not in _FLOAT_DTYPES:  # float8 / float4 codebooks are not stored or computed
        raise ValueError(f"{name} must be a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    return dtype


def _check_skip(value: object) -> tuple[SkipPattern, ...]:
    if isinstance(value, str) or callable(value):
        value = (value,)
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(
            f"AqlmConfig.skip must be a list of module path patterns or callables, got {type(value).__name__}"
        )
    patterns = tuple(value)
    for pattern in patterns:
        if callable(pattern):
            continue
        if not isinstance(pattern, str):
            raise TypeError(
                "AqlmConfig.skip entries must be strings or callables (module_path, module) -> bool, "
                f"got {pattern!r} ({type(pattern).__name__})"
            )
        if not pattern.strip():
            raise ValueError("AqlmConfig.skip has an empty pattern; name a module path such as 'lm_head'")
        if pattern.startswith("re:"):
            if not pattern[3:].strip():
                raise ValueError(
                    f"AqlmConfig.skip pattern {pattern!r} has an empty regular expression, which matches the model "
                    "root ('') and would keep the whole model dense; write the expression after 're:'"
                )
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(
                    f"AqlmConfig.skip pattern {pattern!r} is not a valid regular expression: {error}"
                ) from error
    return patterns


def _other_quant_method(block: Mapping[str, Any]) -> str | None:
    """The repr of the block's ``quant_method`` (of an Enum's value) if it is given and is not ``"aqlm"``."""
    if "quant_method" not in block:
        return None
    method = block["quant_method"]
    method = method.value if isinstance(method, enum.Enum) else method
    return None if isinstance(method, str) and method.lower() == "aqlm" else repr(method)


@dataclasses.dataclass(frozen=True)
class AqlmConfig:
    """How the linear layers of a model are stored in AQLM form.

    Args:
        in_group_size: input features encoded together by one code (``in_features`` must divide by it).
        out_group_size: output features encoded together by one code (``out_features`` must divide by it).
        num_codebooks: additive codebooks summed for each group.
        nbits_per_codebook: bits of each code, 1..16 (codebooks hold ``2**nbits`` entries).
        dtype: dtype of codebooks, scales and bias; ``None`` keeps the dtype each linear layer was built with.
        skip: module path patterns (or predicates) that stay dense; see :mod:`aqlm_ctx.matching`.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: a field is out of range, or a skip pattern is empty or an invalid ``re:`` pattern.

    Example:
        >>> AqlmConfig(num_codebooks=2, nbits_per_codebook=8, skip=["lm_head"]).bits_per_weight
        2.0
    """

    in_group_size: int = 8
    out_group_size: int = 1
    num_codebooks: int = 1
    nbits_per_codebook: int = 16
    dtype: torch.dtype | None = None
    skip: tuple[SkipPattern, ...] = ()

    def __post_init__(self) -> None:
        _check_int("in_group_size", self.in_group_size, 1)
        _check_int("out_group_size", self.out_group_size, 1)
        _check_int("num_codebooks", self.num_codebooks, 1)
        _check_int("nbits_per_codebook", self.nbits_per_codebook, 1, 16)
        object.__setattr__(self, "dtype", parse_float_dtype(self.dtype, "AqlmConfig.dtype"))
        object.__setattr__(self, "skip", _check_skip(self.skip))

    @property
    def codebook_size(self) -> int:
        """Entries in each codebook: ``2**nbits_per_codebook``."""
        return 2**self.nbits_per_codebook

    @property
    def code_dtype(self) -> torch.dtype:
        """The integer dtype codes are stored in: int8 up to 8 bits, int16 above."""
        return torch.int8 if self.nbits_per_codebook <= 8 else torch.int16

    @property
    def bits_per_weight(self) -> float:
        """Code bits per weight, without codebooks and scales (2x8 g8 -> 2.0, 1x16 g8 -> 2.0)."""
        return self.num_codebooks * self.nbits_per_codebook / (self.in_group_size * self.out_group_size)

    @property
    def format_name(self) -> str:
        """A short name such as ``"2x8 g8"`` (``"1x16 g8x2"`` when out_group_size > 1)."""
        groups = f"g{self.in_group_size}" + (f"x{self.out_group_size}" if self.out_group_size > 1 else "")
        return f"{self.num_codebooks}x{self.nbits_per_codebook} {groups}"

    def same_format(self, other: ConfigLike) -> bool:
        """Whether ``other`` (anything :func:`as_config` accepts) stores layers the same way (the four format fields
        agree)."""
        other = as_config(other)
        return all(getattr(self, name) == getattr(other, name) for name in _FORMAT_FIELDS)

    def replace(self, **changes: Any) -> AqlmConfig:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    def with_skip(self, skip: SkipPattern | Iterable[SkipPattern] | None) -> AqlmConfig:
        """A copy whose skip patterns are this config's followed by ``skip``."""
        if skip is None:
            return self
        return self.replace(skip=self.skip + _check_skip(skip))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AqlmConfig:
        """Read a hub ``quantization_config`` dict (or a legacy ``"aqlm"`` block).

        ``linear_weights_not_to_quantize`` and ``modules_to_not_convert`` both become ``skip`` patterns, less the
        ``X.bias`` entries whose ``X`` the lists do not name (neither ``X`` nor ``X.weight``): AQLM's converter lists
        every parameter but the quantized weights, so the biases of quantized layers (Qwen2's q/k/v projections)
        are there too, and as patterns they would keep those layers dense.

        Raises:
            TypeError: ``data`` is not a mapping, or a value has the wrong type.
            ValueError: ``quant_method`` is not ``"aqlm"`` (checked before the keys), a key is unknown, or a value is
                out of range.

        Example:
            >>> AqlmConfig.from_dict({"quant_method": "aqlm", "nbits_per_codebook": 8, "num_codebooks": 2})
            AqlmConfig(in_group_size=8, out_group_size=1, num_codebooks=2, nbits_per_codebook=8, dtype=None, skip=())
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"AqlmConfig.from_dict needs a mapping, got {type(data).__name__}")
        method = _other_quant_method(data)
        if method is not None:  # checked first: another method's keys are not typos of AQLM's
            raise ValueError(
                f"quant_method must be 'aqlm', got {method}: the model is quantized with {method}, not AQLM"
            )
        unknown = sorted(str(key) for key in data if key not in _DICT_KEYS)
        if unknown:
            raise ValueError(
                f"unknown key(s) in the AQLM quantization config: {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(_DICT_KEYS))}"
            )
        skip: list[SkipPattern] = []
        for key in _SKIP_KEYS:
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise TypeError(f"quantization config field {key!r} must be a list of names, got {value!r}")
            skip.extend(value)
        named = {p.removesuffix(".weight") for p in skip if isinstance(p, str)}
        skip = [p for p in skip if not (isinstance(p, str) and p.endswith(".bias") and p[: -len(".bias")] not in named)]
        fields = {name: data[name] for name in _FORMAT_FIELDS if name in data}
        return cls(**fields, dtype=data.get("dtype"), skip=tuple(skip))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> AqlmConfig:
        """Read the config of an AQLM checkpoint: a directory holding ``config.json`` or that file itself.

        Raises:
            FileNotFoundError: there is no ``config.json`` at ``path``.
            ValueError: the file is not JSON or holds no AQLM quantization config.
        """
        return cls.from_dict(read_checkpoint_config(path)[1])

    @classmethod
    def from_transformers(cls, config: Any) -> AqlmConfig:
        """Convert a ``transformers.AqlmConfig`` (its fields and ``linear_weights_not_to_quantize``)."""
        data = {name: getattr(config, name) for name in (*_FORMAT_FIELDS, *_SKIP_KEYS) if hasattr(config, name)}
        return cls.from_dict({"quant_method": "aqlm", **data})


def read_checkpoint_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``config.json`` of an AQLM checkpoint.

    Returns:
        The whole model config and its AQLM block (``quantization_config``, or a legacy top-level ``"aqlm"``).

    Raises:
        FileNotFoundError: no ``config.json`` at ``path``.
        ValueError: the file is not valid JSON, has no AQLM block, or is quantized with another ``quant_method``.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {os.fspath(path)!r}: expected an AQLM checkpoint directory")
    if file.suffix != ".json":
        raise ValueError(
            f"{os.fspath(path)!r} is a file, not a checkpoint's config.json: pass the checkpoint directory "
            f"({file.parent}) that holds it"
        )
    try:
        model_config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(model_config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(model_config).__name__}")
    block = model_config.get("quantization_config")
    if block is None and isinstance(model_config.get("aqlm"), dict):
        block = {"quant_method": "aqlm", **model_config["aqlm"]}
    if not isinstance(block, dict) or "quant_method" not in block:
        found = "a 'quantization_config' block without quant_method" if isinstance(block, dict) else "none"
        raise ValueError(
            f"{file} has no AQLM quantization config: expected a 'quantization_config' block with "
            f"quant_method 'aqlm' (or a legacy top-level 'aqlm' block), found {found}"
        )
    method = _other_quant_method(block)
    if method is not None:
        raise ValueError(
            f"{file}: the checkpoint is quantized with quant_method {method}, not AQLM "
            f"(quant_method must be 'aqlm', got {method})"
        )
    return model_config, block


def as_config(config: ConfigLike | None) -> AqlmConfig:
    """Turn any accepted config form into an :class:`AqlmConfig`.

    Args:
        config: an ``AqlmConfig``; a hub ``quantization_config`` dict; a checkpoint directory or ``config.json``
            path; a ``transformers.AqlmConfig`` or any object with its four format attributes (``in_group_size``,
            ``out_group_size``, ``num_codebooks``, ``nbits_per_codebook``; the seed's integration reads only
            these); or ``None`` for the defaults (1x16 g8).

    Raises:
        TypeError: ``config`` is none of these.
    """
    if config is None:
        return AqlmConfig()
    if isinstance(config, AqlmConfig):
        return config
    if isinstance(config, Mapping):
        return AqlmConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        try:
            return AqlmConfig.from_pretrained(config)
        except OSError as error:
            if isinstance(error, FileNotFoundError):
                raise
            shown = os.fspath(config)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(
                f"expected a checkpoint directory path, got {shown!r}, which cannot be read as one ({error.strerror}); "
                "pass a quantization_config dict as a dict, not as a JSON string"
            ) from error
    if all(hasattr(config, name) for name in _FORMAT_FIELDS):
        return AqlmConfig.from_transformers(config)
    raise TypeError(
        "expected an AqlmConfig, a quantization_config dict, a checkpoint path or a transformers.AqlmConfig, "
        f"got {type(config).__name__}"
    )

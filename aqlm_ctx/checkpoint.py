"""The on-disk format of HF-style AQLM checkpoints: which files hold which tensors, read and written safely.

A checkpoint directory holds ``config.json`` (with a ``quantization_config`` block) and either a single
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. Pickle files (``pytorch_model.bin``) are
read only when the caller opts in, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "CheckpointFiles",
    "write_text_atomically",
    "MappingReader",
    "TensorReader",
    "find_checkpoint_files",
    "open_checkpoint",
    "pickle_only",
    "write_safetensors",
]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class CheckpointFiles:
    """Where each tensor of a checkpoint lives."""

    directory: Path
    weight_map: dict[str, Path]
    """Tensor name -> the file holding it."""
    pickle: bool
    """The files are ``torch.save`` pickles rather than safetensors."""

    @property
    def files(self) -> list[Path]:
        """The weight files, each once, in a stable order."""
        return sorted(set(self.weight_map.values()))

    @property
    def size_bytes(self) -> int:
        """Bytes of all weight files on disk."""
        return sum(file.stat().st_size for file in self.files)


def _corrupt(file: Path, error: Exception) -> ValueError:
    return ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {error}")


def _safetensors_keys(file: Path) -> list[str]:
    with open(file, "rb"):  # a file the process cannot open raises its own OSError (PermissionError), not "corrupt"
        pass
    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt(file, error) from error


def _read_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index} is not a valid shard index (expected a 'weight_map' object): {error}") from error
    bad = [name for name, file in weight_map.items() if not isinstance(file, str) or not file]
    if bad:
        raise ValueError(
            f"{index}: weight_map must map each tensor name to a shard file name, got {weight_map[bad[0]]!r} for "
            f"tensor {bad[0]}"
        )
    files = {name: index.parent / file for name, file in weight_map.items()}
    absent: dict[str, list[str]] = {}
    for name, file in files.items():
        if not file.is_file():
            absent.setdefault(weight_map[name], []).append(name)
    if absent:
        listed = "; ".join(f"{file} (for {len(names)} tensor(s), e.g. {names[0]})" for file, names in absent.items())
        raise FileNotFoundError(f"{index} lists shard files that do not exist: {listed}")
    return files


def _check_index(index: Path, weight_map: Mapping[str, Path], keys: Mapping[Path, list[str]]) -> None:
    """Every tensor the index lists is in its shard (else ValueError); tensors of a shard that it does not list are
    not read, with a warning (transformers tolerates them too; a model that needs one reports it missing)."""
    held = {file: set(names) for file, names in keys.items()}
    for name, file in weight_map.items():
        if name not in held[file]:
            others = [other.name for other, names in held.items() if name in names]
            actual = f"; it is in {', '.join(others)}" if others else "; no shard the index lists holds it"
            raise ValueError(f"{index} maps tensor {name} to {file.name}, which does not hold it{actual}")
    for file, names in keys.items():
        unlisted = [name for name in names if name not in weight_map]
        if unlisted:
            warnings.warn(
                f"{index} does not list {len(unlisted)} tensor(s) that {file.name} holds, e.g. {unlisted[0]}; "
                "they are not read",
                UserWarning,
                stacklevel=3,
            )


def pickle_only(directory: Path) -> str | None:
    """The pickle weight file a directory would be read from (index first), if it holds no safetensors weights."""
    if (directory / SAFETENSORS_INDEX).is_file() or (directory / SAFETENSORS).is_file():
        return None
    return next((name for name in (PICKLE_INDEX, PICKLE) if (directory / name).is_file()), None)


def find_checkpoint_files(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> CheckpointFiles:
    """Find the weight files of a checkpoint directory and map every tensor name to its file.

    Args:
        path: the checkpoint directory.
        allow_pickle: accept ``pytorch_model.bin`` files when no safetensors exist (read with ``weights_only=True``).

    Raises:
        FileNotFoundError: ``path`` is not a directory, it holds no weight files (the message lists what it holds),
            or its shard index lists shard files that do not exist.
        ValueError: only pickle files exist and ``allow_pickle`` is false; a file or index is corrupt; the shard
            index maps a tensor to a shard that does not hold it (a tensor it leaves out is a warning).
    """
    directory = Path(path)
    if not directory.is_dir():
        if directory.is_file():
            raise FileNotFoundError(
                f"{os.fspath(path)!r} is a file, not a checkpoint directory; pass the directory that holds it "
                f"({os.fspath(directory.parent)!r})"
            )
        raise FileNotFoundError(f"checkpoint directory {os.fspath(path)!r} does not exist or is not a directory")
    if (directory / SAFETENSORS_INDEX).is_file():
        weight_map = _read_index(directory / SAFETENSORS_INDEX)
        keys = {file: _safetensors_keys(file) for file in sorted(set(weight_map.values()))}  # fail early if corrupt
        _check_index(directory / SAFETENSORS_INDEX, weight_map, keys)
        return CheckpointFiles(directory, weight_map, pickle=False)
    if (directory / SAFETENSORS).is_file():
        file = directory / SAFETENSORS
        return CheckpointFiles(directory, {name: file for name in _safetensors_keys(file)}, pickle=False)
    pickled = pickle_only(directory)
    if pickled is not None:
        if not allow_pickle:
            raise ValueError(
                f"{directory} holds only pickle weights ({pickled}); unpickling can run arbitrary code, so it is "
                "refused. Convert the checkpoint to safetensors, or pass allow_pickle=True to read it with "
                "torch.load(weights_only=True)"
            )
        if pickled == PICKLE_INDEX:
            return CheckpointFiles(directory, _read_index(directory / PICKLE_INDEX), pickle=True)
        file = directory / PICKLE
        return CheckpointFiles(directory, {name: file for name in _load_pickle(file)}, pickle=True)
    present = sorted(entry.name for entry in directory.iterdir())
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFETENSORS} or {SAFETENSORS_INDEX}; found "
        f"{', '.join(present) if present else 'nothing'}"
    )


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        # Memory-mapped where the file is a zip archive (torch >= 1.6); the legacy format is read whole.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as error:
        raise ValueError(f"{file} could not be read with torch.load(weights_only=True): {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a flat mapping of tensor names to tensors")
    return dict(state)


class TensorReader:
    """Reads tensors by name from the files of a checkpoint, each file opened once."""

    def __init__(self, files: CheckpointFiles, stack: ExitStack) -> None:
        self._files = files
        self._stack = stack
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self._files.weight_map)

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            if self._files.pickle:
                self._handles[file] = _load_pickle(file)
            else:
                try:
                    self._handles[file] = self._stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                except (SafetensorError, OSError) as error:
                    raise _corrupt(file, error) from error
        return self._handles[file]

    def _not_in_file(self, name: str) -> ValueError:
        return ValueError(
            f"{self._files.weight_map[name]} does not hold tensor {name}, which the checkpoint's shard index maps to it"
        )

    def dtype_and_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dtype and shape of a tensor without reading its data.

        Raises:
            KeyError: ``name`` is not a tensor of the checkpoint.
            ValueError: the file the index names does not hold the tensor, or its dtype is not supported.
        """
        handle = self._handle(self._files.weight_map[name])
        if self._files.pickle:
            if name not in handle:
                raise self._not_in_file(name)
            tensor = handle[name]
            return tensor.dtype, tuple(tensor.shape)
        try:
            view = handle.get_slice(name)
        except SafetensorError as error:
            raise self._not_in_file(name) from error
        stored = view.get_dtype()
        if stored not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"{self._files.weight_map[name]}: tensor {name} has dtype {stored}, which aqlm_ctx does not read "
                f"(supported: {', '.join(_SAFETENSORS_DTYPES)})"
            )
        return _SAFETENSORS_DTYPES[stored], tuple(view.get_shape())

    def read(self, name: str) -> torch.Tensor:
        """The tensor's data, on CPU (raises as :meth:`dtype_and_shape`, and ValueError for a corrupt file)."""
        file = self._files.weight_map[name]
        handle = self._handle(file)
        if self._files.pickle:
            if name not in handle:
                raise self._not_in_file(name)
            return handle[name]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise _corrupt(file, error) from error


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MappingReader:
    """Reads tensors from an in-memory mapping, with the interface of :class:`TensorReader`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def dtype_and_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._tensors[name].dtype, tuple(self._tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@contextmanager
def open_checkpoint(files: CheckpointFiles) -> Iterator[TensorReader]:
    """Open a checkpoint's files for reading; they are closed when the block ends."""
    with ExitStack() as stack:
        yield TensorReader(files, stack)


def write_text_atomically(file: Path, text: str) -> None:
    """Write ``file`` through a temporary file and a rename, so readers never see it half written."""
    temporary = file.with_name(f".{file.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, file)


def _save_atomically(tensors: dict[str, torch.Tensor], file: Path, metadata: Mapping[str, str]) -> None:
    # A model loaded from this very file may still map it: a new inode leaves that mapping intact.
    temporary = file.with_name(f".{file.name}.tmp")
    save_file(tensors, temporary, metadata=dict(metadata))
    os.replace(temporary, file)


def write_safetensors(
    directory: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int, metadata: Mapping[str, str]
) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or, above ``max_shard_bytes``, as indexed shards.

    Returns:
        The files written.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        shard_bytes += size
    if len(shards) == 1:
        _save_atomically(shards[0], directory / SAFETENSORS, metadata)
        return [directory / SAFETENSORS]
    written = []
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = directory / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _save_atomically(shard, file, metadata)
        written.append(file)
        weight_map.update(dict.fromkeys(shard, file.name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomically(directory / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
    return [*written, directory / SAFETENSORS_INDEX]

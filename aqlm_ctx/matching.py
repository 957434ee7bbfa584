"""Skip patterns: which modules of a model stay dense.

A pattern names a module path relative to the model root, as ``named_modules()`` prints it. Skipping a module
skips everything inside it (``model.layers.1`` keeps that whole block dense). One semantics serves the context,
the visitor and the decorator:

==========================  =====================================================================================
pattern                     matches the module path ``p`` when
==========================  =====================================================================================
``"lm_head"``               ``p == "lm_head"`` or ``p`` ends with ``".lm_head"`` (dot-aware suffix:
                            ``mlp.gate`` never matches ``mlp.gate_proj``, ``layers.1`` never ``layers.10``)
``"lm_head.weight"``        a trailing ``.weight`` / ``.bias`` names a parameter and means its module
``"model.layers.*.mlp"``    the pattern has ``*``, ``?`` or ``[``: :func:`fnmatch.fnmatchcase` on the whole path
                            (``*`` also crosses dots); Unix shell wildcards, not regular expressions
``"re:.*\\.(k|v)_proj"``     the rest is a regular expression that must match the whole path
``callable``                ``pattern(p, module)`` returns true (layers are shown as the dense ``nn.Linear``
                            the model code built, also inside ``aqlm_quantized``)
==========================  =====================================================================================

Patterns that match no module at all are reported in one warning, so a typo never silently quantizes a layer.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn

from .config import SkipPattern, _check_skip

__all__ = ["Resolution", "SkipMatcher", "iter_module_paths"]

_PARAMETER_SUFFIXES = (".weight", ".bias")
GLOB_CHARACTERS = frozenset("*?[")  # a pattern with one of these is a glob


def _compile(pattern: SkipPattern) -> Callable[[str, nn.Module], bool]:
    if not isinstance(pattern, str):
        return pattern
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda path, module: regex.fullmatch(path) is not None
    for suffix in _PARAMETER_SUFFIXES:
        if pattern.endswith(suffix) and len(pattern) > len(suffix):
            pattern = pattern[: -len(suffix)]
            break
    if GLOB_CHARACTERS.intersection(pattern):
        glob = pattern
        return lambda path, module: fnmatch.fnmatchcase(path, glob)
    dotted = "." + pattern
    return lambda path, module: path == pattern or path.endswith(dotted)


def iter_module_paths(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str | None]]:
    """Every ``(path, module, parent_path)`` under ``root``, once per path (a shared module once for each path).

    The root comes first, with path ``prefix`` (``""`` by default) and parent ``None``; parents precede children.
    """
    stack: list[tuple[str, nn.Module, str | None, frozenset[int]]] = [(prefix, root, None, frozenset())]
    while stack:
        path, module, parent, ancestors = stack.pop()
        yield path, module, parent
        inside = ancestors | {id(module)}
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        for name, child in reversed(children):
            if id(child) not in inside:  # a module that contains itself would never end
                stack.append((f"{path}.{name}" if path else name, child, path, inside))


@dataclass
class Resolution:
    """What a walk of one model found: each module's first path, the skipped modules, the patterns used."""

    modules: dict[int, tuple[str, nn.Module]] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)
    used: set[int] = field(default_factory=set)

    def is_skipped(self, module: nn.Module) -> bool:
        """Whether ``module`` (reached by the walk) stays dense."""
        return id(module) in self.skipped


class SkipMatcher:
    """One predicate for a list of skip patterns (see the module docstring for the semantics).

    Args:
        patterns: strings or callables ``(module_path, module) -> bool``.

    Raises:
        TypeError: a pattern is neither a string nor a callable.
        ValueError: a pattern is empty or an invalid ``re:`` expression.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
        >>> found = SkipMatcher(["1.weight", "re:0"]).resolve(model)
        >>> sorted(path for key, (path, _) in found.modules.items() if key in found.skipped)
        ['0', '1', '1.0']
    """

    def __init__(self, patterns: Iterable[SkipPattern] = ()) -> None:
        self.patterns: tuple[SkipPattern, ...] = _check_skip(tuple(patterns))
        self._predicates = tuple(_compile(pattern) for pattern in self.patterns)

    def __repr__(self) -> str:
        return f"SkipMatcher({list(self.patterns)!r})"

    def matching(self, path: str, module: nn.Module) -> list[int]:
        """Indices of the patterns that match this one module path (not looking at its parents)."""
        return [index for index, predicate in enumerate(self._predicates) if predicate(path, module)]

    @property
    def has_callables(self) -> bool:
        """Whether any pattern is a callable (the only kind that looks at the module itself)."""
        return any(callable(pattern) for pattern in self.patterns)

    def resolve(
        self, root: nn.Module, prefix: str = "", present: Callable[[nn.Module], nn.Module] | None = None
    ) -> Resolution:
        """Walk ``root`` and decide which modules are skipped.

        A module is skipped when any of its paths, or the path of any module containing it, matches a pattern.
        Paths are relative to ``root`` (whose own path is ``prefix``, ``""`` by default).

        Args:
            present: what callable patterns are shown for a module (the construction context shows a layer it
                already quantized as the dense ``nn.Linear`` the model code built, as the visitor sees it).
        """
        found = Resolution()
        skipped_paths: set[str] = set()
        for path, module, parent in iter_module_paths(root, prefix):
            found.modules.setdefault(id(module), (path, module))
            hits = self.matching(path, present(module) if present is not None else module)
            found.used.update(hits)
            if hits or (parent is not None and parent in skipped_paths):
                skipped_paths.add(path)
                found.skipped.add(id(module))
        return found

    def warn_unused(self, used: set[int], where: str) -> None:
        """Emit one warning that lists the patterns whose indices are not in ``used``."""
        unused = [pattern for index, pattern in enumerate(self.patterns) if index not in used]
        if unused:
            names = ", ".join(repr(p) if isinstance(p, str) else getattr(p, "__name__", repr(p)) for p in unused)
            warnings.warn(
                f"{where}: skip pattern(s) matched no module: {names}; check them against model.named_modules()",
                UserWarning,
                stacklevel=3,
            )

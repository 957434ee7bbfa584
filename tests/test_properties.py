"""Property tests: on random module trees, context ≡ decorator ≡ visitor, and skips follow the documented table.

Trees nest plain modules, ``nn.Sequential``, ``nn.ModuleList`` and ``nn.ModuleDict``; they hold Linear layers with and
without bias, Linear subclasses, embeddings tied to linear layers, and modules shared under two paths. Skip lists mix
every pattern kind of :mod:`aqlm_ctx.matching`. The expected set of quantized paths comes from an oracle written
here from the docstring table (not from ``SkipMatcher``).
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from aqlm import QuantizedLinear
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from aqlm_ctx import AqlmConfig, aqlm_quantized, quantize_model, replace_linear_layers

from .utils import quantized_paths, signature

NAMES = ["a", "b", "fc", "fc1", "c1", "proj", "q_proj", "head", "layers", "x1"]
DIMS = [8, 16]


class SubLinear(nn.Linear):
    """A Linear subclass: never quantized."""


# ---------------------------------------------------------------------------------------------------------------
# Tree specs and one deterministic builder for all three construction ways.


@dataclass
class Leaf:
    kind: str  # "linear", "sub", "embed", "norm"
    a: int
    b: int
    bias: bool


@dataclass
class Node:
    kind: str  # "module", "seq", "list", "dict"
    children: list[tuple[str, Any]]


@dataclass
class Spec:
    root: Node
    shares: list[int] = field(default_factory=list)  # build-order indices of modules also attached to the root
    ties: list[int] = field(default_factory=list)  # build-order indices of linear layers tied to a new embedding


leaves = st.builds(
    Leaf,
    kind=st.sampled_from(["linear", "linear", "linear", "sub", "embed", "norm"]),
    a=st.sampled_from(DIMS),
    b=st.sampled_from(DIMS),
    bias=st.booleans(),
)


def nodes(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Node]:
    named = st.lists(st.tuples(st.sampled_from(NAMES), children), min_size=1, max_size=3, unique_by=lambda c: c[0])
    return st.one_of(
        st.builds(Node, kind=st.sampled_from(["module", "dict"]), children=named),
        st.builds(Node, kind=st.sampled_from(["seq", "list"]), children=named),
    )


trees = st.recursive(leaves, nodes, max_leaves=8).map(
    lambda t: t if isinstance(t, Node) else Node("module", [("a", t)])
)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    root = draw(trees)
    count = _count(root)
    shares = draw(st.lists(st.integers(0, count - 1), max_size=2, unique=True))
    ties = draw(st.lists(st.integers(0, count - 1), max_size=2, unique=True))
    return Spec(root, shares, ties)


def _count(tree: Any) -> int:
    return 1 + (sum(_count(child) for _, child in tree.children) if isinstance(tree, Node) else 0)


def build(spec: Spec) -> nn.Module:
    """Build the tree; every module is numbered in build order (children before their container)."""
    built: list[nn.Module] = []
    kinds: list[str] = []  # from the spec: the built class differs between the three ways

    def make(tree: Any) -> nn.Module:
        if isinstance(tree, Leaf):
            if tree.kind == "linear":
                module: nn.Module = nn.Linear(tree.a, tree.b, bias=tree.bias)
            elif tree.kind == "sub":
                module = SubLinear(tree.a, tree.b, bias=tree.bias)
            elif tree.kind == "embed":
                module = nn.Embedding(tree.b, tree.a)  # weight [b, a], the shape of Linear(a, b).weight
            else:
                module = nn.LayerNorm(tree.a)
        else:
            children = [(name, make(child)) for name, child in tree.children]
            if tree.kind == "seq":
                module = nn.Sequential(*(child for _, child in children))
            elif tree.kind == "list":
                module = nn.ModuleList(child for _, child in children)
            elif tree.kind == "dict":
                module = nn.ModuleDict(dict(children))
            else:
                module = nn.Module()
                for name, child in children:
                    setattr(module, name, child)
        built.append(module)
        kinds.append(tree.kind)
        return module

    root = make(spec.root)
    for number, index in enumerate(spec.shares):
        if built[index] is not root:
            setattr(root, f"shared{number}", built[index])  # reachable by a second path
    for number, index in enumerate(spec.ties):
        linear = built[index]
        if kinds[index] in ("linear", "sub"):  # tied like an lm_head to a new embedding (a quantized one drops it)
            embed = nn.Embedding(linear.out_features, linear.in_features)
            setattr(root, f"tied{number}", embed)
            linear.weight = embed.weight
    return root


# ---------------------------------------------------------------------------------------------------------------
# Skip patterns of every kind, and an oracle written from the matching docstring's table.


def _paths(spec: Spec) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [path for path, _ in build(spec).named_modules(remove_duplicate=False)]


@dataclass(frozen=True)
class EndsWith:
    """A callable skip pattern ``(path, module) -> bool``, looking at the module too."""

    name: str
    out_features: int | None

    def __call__(self, path: str, module: nn.Module) -> bool:
        wanted = self.out_features is None or getattr(module, "out_features", None) == self.out_features
        return path.rsplit(".", 1)[-1] == self.name and wanted


@st.composite
def patterns(draw: st.DrawFn, paths: list[str]) -> Any:
    real = [path for path in paths if path]
    path = draw(st.sampled_from(real)) if real else "a"
    parts = path.split(".")
    suffix = ".".join(parts[draw(st.integers(0, len(parts) - 1)) :])
    last = parts[-1]
    cut = draw(st.integers(1, max(1, len(last) - 1)))
    kind = draw(st.sampled_from(["exact", "suffix", "tail", "param", "glob", "prefix", "regex", "callable", "random"]))
    if kind == "exact":
        return path
    if kind == "suffix":
        return suffix
    if kind == "tail":  # the end of a name, not a whole name: "c1" must not match "fc1"
        return last[cut:] if len(last) > 1 else last
    if kind == "prefix":  # a glob cut inside a name: "f*" is matched against the whole path
        return draw(st.sampled_from(["", "*", "*."])) + ".".join([*parts[:-1], last[:cut] + "*"]).lstrip(".")
    if kind == "param":
        return suffix + draw(st.sampled_from([".weight", ".bias"]))
    if kind == "glob":
        index = draw(st.integers(0, len(parts) - 1))
        wild = draw(st.sampled_from(["*", "?" * len(parts[index]), "[a-z0-9_]*"]))
        glob = ".".join(wild if i == index else part for i, part in enumerate(parts))
        return glob + draw(st.sampled_from(["", "", ".weight"]))
    if kind == "regex":
        return "re:" + draw(st.sampled_from([re.escape(path), ".*" + re.escape(parts[-1]), r"(.*\.)?" + parts[-1]]))
    if kind == "callable":
        return EndsWith(parts[-1], draw(st.sampled_from([None, 8, 16])))
    return draw(st.sampled_from(NAMES))  # may match many modules, or none


def oracle_matches(pattern: Any, path: str, module: nn.Module) -> bool:
    """The docstring table of aqlm_ctx.matching, one row at a time."""
    if callable(pattern):
        return bool(pattern(path, module))
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    for parameter in (".weight", ".bias"):  # a trailing .weight / .bias means its module
        if pattern.endswith(parameter) and pattern != parameter:
            pattern = pattern[: -len(parameter)]
            break
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


def oracle_quantized(model: nn.Module, skip: list[Any]) -> set[str]:
    """Paths of exact nn.Linear modules none of whose paths, nor any containing module's path, matches a pattern."""
    modules = dict(model.named_modules(remove_duplicate=False))
    paths_of: dict[int, list[str]] = {}
    for path, module in modules.items():
        paths_of.setdefault(id(module), []).append(path)

    def path_matches(path: str) -> bool:
        parts = path.split(".") if path else []
        prefixes = [".".join(parts[:end]) for end in range(len(parts) + 1)]  # the root "", then each ancestor
        return any(oracle_matches(p, prefix, modules[prefix]) for prefix in prefixes for p in skip)

    return {
        path
        for path, module in modules.items()
        if type(module) is nn.Linear and not any(path_matches(other) for other in paths_of[id(module)])
    }


CONFIGS = st.sampled_from(
    [
        AqlmConfig(num_codebooks=2, nbits_per_codebook=8),
        AqlmConfig(nbits_per_codebook=4, out_group_size=2),
        AqlmConfig(in_group_size=4, num_codebooks=1, nbits_per_codebook=2, dtype=torch.float16),
    ]
)


Case = tuple[Spec, AqlmConfig, list[Any]]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    spec = draw(specs())
    skip = draw(st.lists(patterns(_paths(spec)), max_size=4))
    return spec, draw(CONFIGS), skip


def three_ways(spec: Spec, config: AqlmConfig, skip: list[Any]) -> tuple[nn.Module, nn.Module, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unused patterns
        with aqlm_quantized(config, skip=skip):
            by_context = build(spec)
        by_decorator = quantize_model(config, skip=skip)(build)(spec)
        with torch.device("meta"):
            by_visitor = build(spec)
        replace_linear_layers(by_visitor, config, skip=skip)
    return by_context, by_decorator, by_visitor


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_context_decorator_and_visitor_agree_with_the_documented_skips(
    case: tuple[Spec, AqlmConfig, list[Any]],
) -> None:
    spec, config, skip = case
    by_context, by_decorator, by_visitor = three_ways(spec, config, skip)
    expected = signature(by_context)
    assert signature(by_decorator) == expected
    assert signature(by_visitor) == expected

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = build(spec)
    wanted = oracle_quantized(dense, skip)
    assert {p for p, m in by_context.named_modules(remove_duplicate=False) if type(m) is QuantizedLinear} == wanted
    assert quantized_paths(by_context) <= wanted
    # Everything else keeps its class; nothing has real storage.
    classes = [type(m) for _, m in dense.named_modules(remove_duplicate=False)]
    for (path, module), cls in zip(by_context.named_modules(remove_duplicate=False), classes, strict=True):
        assert type(module) is (QuantizedLinear if path in wanted else cls)
        if isinstance(module, QuantizedLinear):
            assert module.codebooks.dtype == (config.dtype or torch.float32)
            assert set(dict(module.named_parameters(recurse=False))) <= {"codes", "codebooks", "scales", "bias"}
    assert all(t.device.type == "meta" for t in [*by_context.parameters(), *by_context.buffers()])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([*NAMES, "fc1.weight", "*c1", "re:.*c1", "layers.1", "a.b"]), st.lists(st.sampled_from(NAMES)))
def test_oracle_and_library_agree_on_single_paths(pattern: str, parts: list[str]) -> None:
    """A cheap cross-check: one module, one path, one pattern (catches e.g. 'c1' wrongly matching 'fc1')."""
    path = ".".join(parts)
    model: nn.Module = nn.Linear(8, 8)
    for name in reversed(parts):
        parent = nn.Module()
        setattr(parent, name, model)
        model = parent
    expected = oracle_quantized(model, [pattern])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replace_linear_layers(model, AqlmConfig(), skip=[pattern])
    assert quantized_paths(model) == expected
    assert (path in expected) == (not oracle_matches_any(pattern, path))


def oracle_matches_any(pattern: str, path: str) -> bool:
    parts = path.split(".") if path else []
    return any(oracle_matches(pattern, ".".join(parts[:end]), nn.Module()) for end in range(len(parts) + 1))


def test_callable_patterns_see_the_same_module_in_context_and_visitor() -> None:
    """A torchao-style filter ``isinstance(module, nn.Linear)`` must select the same layers both ways."""
    seen: dict[str, list[str]] = {"context": [], "visitor": []}
    warnings.simplefilter("ignore")

    def recorder(where: str) -> Callable[[str, nn.Module], bool]:
        def pattern(path: str, module: nn.Module) -> bool:
            seen[where].append(f"{path}:{type(module).__name__}")
            return False

        return pattern

    spec = Spec(Node("module", [("fc", Leaf("linear", 8, 8, True))]))
    with aqlm_quantized(AqlmConfig(), skip=[recorder("context")]):
        build(spec)
    replace_linear_layers(build(spec), AqlmConfig(), skip=[recorder("visitor")])
    assert seen["visitor"] == [":Module", "fc:Linear"]
    assert seen["context"] == seen["visitor"]

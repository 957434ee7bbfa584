"""Skip-pattern semantics: one table, checked in both directions on every module of a model."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from aqlm_ctx import SkipMatcher


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.ModuleDict({"gate": nn.Linear(8, 8), "gate_proj": nn.Linear(8, 8)})
        self.attn = nn.Linear(8, 8)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(11))
        self.lm_head = nn.Linear(8, 8)


MODEL = Model()
ALL_PATHS = {path for path, _ in MODEL.named_modules()}


def skipped(*patterns: object) -> set[str]:
    found = SkipMatcher(patterns).resolve(MODEL)  # type: ignore[arg-type]
    return {path for key, (path, _) in found.modules.items() if key in found.skipped}


def below(path: str) -> set[str]:
    return {p for p in ALL_PATHS if p == path or p.startswith(path + ".")}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("lm_head", {"lm_head"}),
        ("lm_head.weight", {"lm_head"}),
        ("layers.0.mlp.gate.bias", {"layers.0.mlp.gate"}),
        ("mlp.gate", {f"layers.{i}.mlp.gate" for i in range(11)}),
        ("layers.1", below("layers.1")),
        ("layers.1.attn", {"layers.1.attn"}),
        ("layers.*.attn", {f"layers.{i}.attn" for i in range(11)}),
        ("layers.1?.attn", {"layers.10.attn"}),
        ("layers.[0-1].attn", {"layers.0.attn", "layers.1.attn"}),
        ("*gate_proj", {f"layers.{i}.mlp.gate_proj" for i in range(11)}),
        (r"re:layers\.(2|3)\.mlp", below("layers.2.mlp") | below("layers.3.mlp")),
        ("re:.*_proj", {f"layers.{i}.mlp.gate_proj" for i in range(11)}),
        ("re:attn", set()),  # a regex must match the whole path
        ("ttn", set()),  # suffixes are dot-aware
    ],
)
def test_semantics_table(pattern: str, expected: set[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert skipped(pattern) == expected


def test_layers_1_never_matches_layers_10_and_gate_never_gate_proj() -> None:
    result = skipped("layers.1", "mlp.gate")
    assert result == below("layers.1") | {f"layers.{i}.mlp.gate" for i in range(11)}
    assert "layers.10" not in result and "layers.10.mlp.gate_proj" not in result


def test_callable_receives_path_and_module_and_skips_children() -> None:
    seen: list[tuple[str, type]] = []

    def by_type(path: str, module: nn.Module) -> bool:
        seen.append((path, type(module)))
        return isinstance(module, nn.ModuleDict) and path == "layers.4.mlp"

    assert skipped(by_type) == below("layers.4.mlp")
    assert ("lm_head", nn.Linear) in seen and ("", Model) in seen


def test_patterns_combine() -> None:
    assert skipped("lm_head", "layers.0") == {"lm_head"} | below("layers.0")


def test_unmatched_patterns_warn_once_listing_them() -> None:
    matcher = SkipMatcher(["lm_head", "lm_haed", "re:nothing"])
    found = matcher.resolve(MODEL)
    with pytest.warns(UserWarning, match="'lm_haed', 're:nothing'") as record:
        matcher.warn_unused(found.used, "test")
    assert len(record) == 1 and "'lm_head'" not in str(record[0].message)


def test_shared_module_is_skipped_if_any_path_is() -> None:
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    found = SkipMatcher(["a"]).resolve(model)
    assert id(shared) in found.skipped


def test_prefix_makes_paths_absolute() -> None:
    found = SkipMatcher(["model.lm_head"]).resolve(MODEL, prefix="model")
    assert id(MODEL.lm_head) in found.skipped


@pytest.mark.parametrize(
    ("pattern", "error"), [("", ValueError), ("re:[", ValueError), (3, TypeError), (None, TypeError)]
)
def test_bad_patterns(pattern: object, error: type) -> None:
    with pytest.raises(error, match="skip"):
        SkipMatcher([pattern])  # type: ignore[list-item]

"""@quantize_model on functions, methods, classmethods and staticmethods; misuse errors."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
from aqlm import QuantizedLinear
from torch import nn

from aqlm_ctx import AqlmConfig, aqlm_quantized, quantize_model

from .test_construction import CONFIG, TinyLM
from .utils import signature


@quantize_model(CONFIG, skip=["lm_head"])
def build(vocab: int = 32, *, tie: bool = True) -> TinyLM:
    """Build a tiny LM."""
    return TinyLM(vocab, tie=tie)


class Factory:
    @quantize_model(CONFIG, skip=["lm_head"])
    def method(self, vocab: int = 32) -> TinyLM:
        return TinyLM(vocab)

    @classmethod
    @quantize_model(CONFIG, skip=["lm_head"])
    def inner_classmethod(cls, vocab: int = 32) -> TinyLM:
        return TinyLM(vocab)

    @quantize_model(CONFIG, skip=["lm_head"])
    @classmethod
    def outer_classmethod(cls, vocab: int = 32) -> TinyLM:
        assert cls is Factory
        return TinyLM(vocab)

    @quantize_model(CONFIG, skip=["lm_head"])
    @staticmethod
    def static(vocab: int = 32) -> TinyLM:
        return TinyLM(vocab)


def test_all_callable_kinds_give_the_same_model_as_the_context() -> None:
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        built = TinyLM(48)
    expected = signature(built)
    for model in (
        build(48),
        Factory().method(48),
        Factory.inner_classmethod(48),
        Factory.outer_classmethod(48),
        Factory.static(48),
        Factory().static(48),
    ):
        assert signature(model) == expected
        assert model.lm_head.weight is model.embed.weight


def test_signature_and_docstring_are_kept() -> None:
    assert build.__doc__ == "Build a tiny LM."
    assert build.__name__ == "build"
    assert list(inspect.signature(build).parameters) == ["vocab", "tie"]


def test_skips_are_relative_to_the_returned_model() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = TinyLM(tie=False)

    @quantize_model(CONFIG, skip=["layers.0"])
    def backbone_only() -> nn.Module:
        return Wrapper().backbone  # the wrapper is thrown away: paths start at the backbone

    model = backbone_only()
    assert type(model.layers[0]["q"]) is nn.Linear and type(model.layers[1]["q"]) is QuantizedLinear

    @quantize_model(CONFIG, skip=["^nothing"])
    def attached() -> nn.Module:
        return TinyLM()

    with pytest.warns(UserWarning, match="nothing"):
        attached()


def test_misuse() -> None:
    with pytest.raises(TypeError, match=r"needs a config: write @quantize_model\(config"):

        @quantize_model  # type: ignore[arg-type]
        def bare() -> nn.Module:
            return nn.Linear(8, 8)

    with pytest.raises(TypeError, match="callable model factory"):
        quantize_model(CONFIG)(42)  # type: ignore[type-var]

    @quantize_model(CONFIG)
    def not_a_model() -> int:
        nn.Linear(8, 8)
        return 3

    with pytest.raises(TypeError, match="not_a_model.*returned int, not a torch.nn.Module"):
        not_a_model()
    assert type(nn.Linear(8, 8)) is nn.Linear


def test_factory_exception_propagates_and_restores() -> None:
    @quantize_model(AqlmConfig())
    def broken() -> nn.Module:
        nn.Linear(8, 8)
        raise OSError("disk")

    before = dict(vars(nn.Linear))
    with pytest.raises(OSError, match="disk"):
        broken()
    assert all(vars(nn.Linear)[key] is value for key, value in before.items())


def test_a_factory_that_calls_itself_builds_into_the_outer_model() -> None:
    """Towers built by the same decorated factory: skip paths are relative to the model the outermost call returns,
    as with the visitor on the same architecture."""

    @quantize_model(CONFIG, skip=["vision.proj"])
    def tower(kind: str) -> nn.Module:
        model = nn.Module()
        if kind == "composite":
            model.text = tower("text")
            model.vision = tower("vision")
            model.head = nn.Linear(16, 16)
        else:
            model.proj = nn.Linear(16, 16)
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the inner calls do not warn that "vision.proj" matched nothing
        model = tower("composite")
    assert type(model.vision.proj) is nn.Linear
    assert type(model.text.proj) is QuantizedLinear and type(model.head) is QuantizedLinear
    with pytest.warns(UserWarning, match="'vision.proj'"):  # called alone it is its own model, with path "proj"
        assert type(tower("vision").proj) is QuantizedLinear


def test_unused_pattern_warnings_name_the_factory() -> None:
    @quantize_model(CONFIG, skip=["lm_heda"])
    def build_small() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 16))

    with pytest.warns(UserWarning, match=r"^@quantize_model on .*build_small: skip pattern\(s\) matched no module"):
        build_small()


def test_a_decorated_model_fn_under_from_pretrained_warns_nothing(tmp_path: Path) -> None:
    """from_pretrained's own block builds nothing when model_fn is a decorated factory (the factory's block does):
    it has no unused patterns to report."""
    from aqlm_ctx import from_pretrained, load_tensors, save_checkpoint
    from aqlm_ctx.testing import random_tensors

    @quantize_model(CONFIG, skip=["lm_head"])
    def decorated() -> TinyLM:
        return TinyLM()

    model = load_tensors(decorated(), random_tensors(decorated()))
    save_checkpoint(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = from_pretrained(tmp_path, model_fn=decorated)
    assert signature(loaded) == signature(model)

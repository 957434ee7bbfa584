"""@quantize_model on functions, methods, classmethods and staticmethods; misuse errors."""

from __future__ import annotations

import inspect

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

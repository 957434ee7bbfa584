"""Faults: exceptions at every stage leave torch exactly as it was, and the visitor converts all or nothing.

Malformed checkpoints (shard indexes that disagree with their shards, files for directories, configs of other
quantization methods) raise ValueError (FileNotFoundError for absent files) naming the file, tensor or field.

After each fault, every attribute aqlm_ctx patches is the very same object as before (``vars(nn.Linear)``,
``vars(nn.Module)``), torch's global module-registration hooks are gone, the torch function mode stack has its old
depth, and ordinary layers and tensors are built as usual. Nesting, re-entering and combining with
``torch.device("meta")`` and accelerate's ``init_empty_weights`` behave as the ``aqlm_quantized`` docstring says.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from aqlm import QuantizedLinear
from safetensors.torch import save_file
from torch import nn

import aqlm_ctx.construction
import aqlm_ctx.layers
import aqlm_ctx.visitor
from aqlm_ctx import AqlmConfig, aqlm_quantized, from_pretrained, quantize_model, replace_linear_layers
from aqlm_ctx.checkpoint import find_checkpoint_files, open_checkpoint

from .hub import write_llama_checkpoint
from .test_loading import tiny_llama
from .utils import quantized_paths, signature

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)


class Boom(Exception):
    pass


class Small(nn.Module):
    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(16, 16), "fc": nn.Linear(16, 32, bias=False)}) for _ in range(2)
        )
        if fail_after == 0:
            raise Boom("inside __init__")
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 32, bias=False)


State = tuple[dict[str, object], dict[str, object], int]


def snapshot() -> State:
    return dict(vars(nn.Linear)), dict(vars(nn.Module)), torch._C._len_torch_function_stack()


def assert_restored(before: State) -> None:
    linear, module, depth = snapshot()
    for now, then in ((linear, before[0]), (module, before[1])):
        assert now.keys() == then.keys()
        assert [key for key in then if now[key] is not then[key]] == []
    assert depth == before[2]
    assert torch.nn.modules.module._global_module_registration_hooks == {}
    plain = Small()
    assert not quantized_paths(plain)
    assert all(p.device.type == "cpu" for p in plain.parameters())
    assert torch.empty(1).device.type == "cpu"


@pytest.fixture
def before() -> Iterator[State]:
    state = snapshot()
    yield state
    assert_restored(state)


# ---------------------------------------------------------------------------------------------------------------
# Exceptions in the block, in a model's __init__, in a decorated factory, while skips are applied.


def test_exception_inside_the_block(before: State) -> None:
    built: list[nn.Module] = []
    with pytest.raises(Boom), aqlm_quantized(CONFIG, skip=["head"]):
        built.append(Small())
        raise Boom
    assert_restored(before)
    # Documented: "If the block ends with an exception, layers are left as built and no skips are applied."
    assert type(built[0].head) is QuantizedLinear


def test_base_exception_inside_the_block(before: State) -> None:
    with pytest.raises(KeyboardInterrupt), aqlm_quantized(CONFIG):
        Small()
        raise KeyboardInterrupt


def test_exception_inside_model_init(before: State) -> None:
    with pytest.raises(Boom, match="inside __init__"), aqlm_quantized(CONFIG):
        Small(fail_after=0)


def test_exception_inside_a_decorated_factory(before: State) -> None:
    @quantize_model(CONFIG, skip=["head"])
    def factory(fail: bool) -> nn.Module:
        model = Small()
        if fail:
            raise Boom("factory")
        return model

    with pytest.raises(Boom, match="factory"):
        factory(True)
    assert_restored(before)
    assert type(factory(False).head) is nn.Linear  # the same decorated factory still works afterwards


def test_factory_returning_a_non_module_restores(before: State) -> None:
    @quantize_model(CONFIG)
    def factory() -> Any:
        return {"model": Small()}

    with pytest.raises(TypeError, match="returned dict"):
        factory()


def test_skip_callable_raising_when_the_block_ends(before: State) -> None:
    def fails_on_head(path: str, module: nn.Module) -> bool:
        if path == "head":
            raise Boom(f"cannot decide {path}")
        return False

    with pytest.raises(Boom, match="cannot decide head"), aqlm_quantized(CONFIG, skip=[fails_on_head]):
        model = Small()
    assert quantized_paths(model) == {"blocks.0.q", "blocks.0.fc", "blocks.1.q", "blocks.1.fc", "head"}


def test_not_divisible_error_at_block_end_restores(before: State) -> None:
    with pytest.raises(ValueError, match="in_features=12"), aqlm_quantized(CONFIG):
        nn.Sequential(nn.Linear(16, 16), nn.Linear(12, 16))


def test_failure_while_opening_the_block_restores(before: State, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(block: object) -> None:
        raise Boom("no mode")

    monkeypatch.setattr(aqlm_ctx.construction, "_push_mode", broken)
    with pytest.raises(Boom, match="no mode"), aqlm_quantized(CONFIG):
        pass  # pragma: no cover - never entered
    monkeypatch.undo()
    assert_restored(before)


def test_exception_in_nested_block_leaves_the_outer_one_working(before: State) -> None:
    with aqlm_quantized(CONFIG, skip=["head"]):
        with pytest.raises(Boom), aqlm_quantized(AqlmConfig(), skip=["nothing"]):
            Small()
            raise Boom
        model = Small()
        assert torch.empty(1).device.type == "meta"
    assert type(model.head) is nn.Linear and model.blocks[0]["q"].num_codebooks == 2


def test_exception_in_reentered_context_leaves_it_working(before: State) -> None:
    context = aqlm_quantized(CONFIG, skip=["head"])
    with context:
        with pytest.raises(Boom), context:
            raise Boom
        model = Small()
    with context:
        again = Small()
    assert signature(model) == signature(again)
    assert type(model.head) is nn.Linear and type(model.blocks[1]["fc"]) is QuantizedLinear


def test_wrong_exit_order_is_an_error_and_recoverable(before: State) -> None:
    outer, inner = aqlm_quantized(CONFIG), aqlm_quantized(AqlmConfig())
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="reverse order"):
        outer.__exit__(None, None, None)
    assert type(nn.Linear(16, 16)) is QuantizedLinear  # both still open
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="no block is open"):
        outer.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# Combining with torch.device("meta") and accelerate's init_empty_weights, in every order, with and without faults.


def _contexts() -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    return {
        "aqlm": lambda: aqlm_quantized(CONFIG, skip=["head"]),
        "meta": lambda: torch.device("meta"),
        "empty": lambda: init_empty_weights(),
    }


@pytest.mark.parametrize("order", list(itertools.permutations(["aqlm", "meta", "empty"])), ids="-".join)
@pytest.mark.parametrize("fail", [False, True], ids=["ok", "raises"])
def test_any_order_with_meta_and_init_empty_weights(order: tuple[str, ...], fail: bool, before: State) -> None:
    with aqlm_quantized(CONFIG, skip=["head"]):
        alone = Small()
    reference = signature(alone)
    makers = _contexts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with ExitStack() as stack:
                for name in order:
                    stack.enter_context(makers[name]())
                model = Small()
                if fail:
                    raise Boom
        except Boom:
            assert fail
    assert_restored(before)
    if not fail:
        assert signature(model) == reference


def test_meta_and_init_empty_weights_alone_still_work_after_blocks(before: State) -> None:
    with aqlm_quantized(CONFIG):
        Small()
    with torch.device("meta"):
        on_meta = Small()
    with init_empty_weights():
        empty = Small()
    for model in (on_meta, empty):
        assert not quantized_paths(model)
        assert all(p.device.type == "meta" for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The visitor: a fault halfway leaves the model fully converted or untouched, with the original error.


def _state(model: nn.Module) -> list[tuple[str, type, dict[str, Any]]]:
    """Class and attribute values (by identity) of every module: 'untouched' means this is unchanged."""
    return [(path, type(m), dict(vars(m))) for path, m in model.named_modules(remove_duplicate=False)]


def assert_untouched(model: nn.Module, state: list[tuple[str, type, dict[str, Any]]]) -> None:
    now = _state(model)
    assert [(path, cls) for path, cls, _ in now] == [(path, cls) for path, cls, _ in state]
    for (_, _, attrs), (path, _, old) in zip(now, state, strict=True):
        assert attrs.keys() == old.keys(), path
        assert all(attrs[key] is old[key] for key in old), path
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_visitor_property_raising_on_one_module(before: State) -> None:
    """``in_features`` of one exact nn.Linear cannot be read (a class property shadows the instance attribute)."""
    model = Small()
    state = _state(model)
    target = model.blocks[1]["q"]

    def in_features(self: nn.Module) -> int:
        if self is target:
            raise Boom("in_features unreadable")
        return self.__dict__["in_features"]

    nn.Linear.in_features = property(in_features)  # type: ignore[assignment]
    try:
        with pytest.raises(Boom, match="in_features unreadable"):
            replace_linear_layers(model, CONFIG)
    finally:
        del nn.Linear.in_features
    assert_untouched(model, state)


def test_visitor_matcher_callable_raising_on_one_path(before: State) -> None:
    model = Small()
    state = _state(model)

    def fails_on(path: str, module: nn.Module) -> bool:
        if path == "blocks.1.fc":
            raise Boom(f"matcher failed on {path}")
        return False

    with pytest.raises(Boom, match="matcher failed on blocks.1.fc"):
        replace_linear_layers(model, CONFIG, skip=[fails_on])
    assert_untouched(model, state)


@pytest.mark.parametrize("failing_call", [1, 3, 5])
@pytest.mark.parametrize("function", ["new_quantized_linear", "make_quantized_in_place"])
def test_visitor_failing_on_the_nth_layer_leaves_the_model_untouched(
    function: str, failing_call: int, before: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Small()
    state = _state(model)
    owner = aqlm_ctx.visitor if function == "new_quantized_linear" else aqlm_ctx.layers  # where it is looked up
    original = getattr(owner, function)
    calls = {"count": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] == failing_call:
            raise Boom(f"{function} failed on call {failing_call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, function, flaky)
    with pytest.raises(Boom, match=f"failed on call {failing_call}"):
        replace_linear_layers(model, CONFIG)
    assert_untouched(model, state)
    monkeypatch.undo()
    replace_linear_layers(model, CONFIG)  # and the model can still be converted, fully
    assert quantized_paths(model) == {"blocks.0.q", "blocks.0.fc", "blocks.1.q", "blocks.1.fc", "head"}
    with aqlm_quantized(CONFIG):
        expected = Small()
    assert [type(m) for m in model.modules()] == [type(m) for m in expected.modules()]


def test_visitor_not_divisible_names_the_layer_and_leaves_the_model_untouched(before: State) -> None:
    model = Small()
    model.blocks[1]["odd"] = nn.Linear(16, 10)
    state = _state(model)
    with pytest.raises(ValueError, match=r"blocks\.1\.odd: Linear\(16, 10\).*out_group_size=4"):
        replace_linear_layers(model, CONFIG.replace(out_group_size=4))
    assert_untouched(model, state)


def test_fault_while_densifying_at_block_end_restores_torch(before: State, monkeypatch: pytest.MonkeyPatch) -> None:
    original = aqlm_ctx.construction.make_dense_in_place
    calls = {"count": 0}

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls["count"] += 1
        if calls["count"] == 2:
            raise Boom("densify failed")
        original(*args, **kwargs)

    monkeypatch.setattr(aqlm_ctx.construction, "make_dense_in_place", flaky)
    with pytest.raises(Boom, match="densify failed"), aqlm_quantized(CONFIG, skip=["blocks.0"]):
        Small()


# ---------------------------------------------------------------------------------------------------------------
# Malformed checkpoints and configs: ValueError (FileNotFoundError for absent files) naming the file and tensor.


def _write_shards(directory: Path, weight_map: dict[str, Any]) -> None:
    """Shards a.safetensors (``x``) and b.safetensors (``y``, ``w``), and an index with ``weight_map``."""
    save_file({"x": torch.zeros(2)}, directory / "a.safetensors")
    save_file({"y": torch.ones(2), "w": torch.ones(3)}, directory / "b.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


A, B = "a.safetensors", "b.safetensors"


@pytest.mark.parametrize(
    ("weight_map", "error", "words"),
    [
        (
            {"x": B, "y": A, "w": B},
            ValueError,
            r"maps tensor x to b\.safetensors, which does not hold it; it is in a\.",
        ),
        (
            {"x": A, "y": B, "w": B, "z": B},
            ValueError,
            r"maps tensor z to b\.safetensors, .*no shard the index lists holds it",
        ),
        ({"x": A, "y": "c.safetensors"}, FileNotFoundError, r"do not exist: c\.safetensors .*e\.g\. y"),
        ({"x": A, "y": 3}, ValueError, "must map each tensor name to a shard file name, got 3 for tensor y"),
    ],
    ids=["wrong-shard", "absent-tensor", "absent-shard", "not-a-name"],
)
def test_bad_shard_index_names_index_tensor_and_shard(
    tmp_path: Path, weight_map: dict[str, Any], error: type[Exception], words: str
) -> None:
    _write_shards(tmp_path, weight_map)
    with pytest.raises(error, match=words) as info:
        find_checkpoint_files(tmp_path)
    assert type(info.value) is error and "model.safetensors.index.json" in str(info.value)


def test_a_tensor_the_index_leaves_out_is_not_read_with_a_warning(tmp_path: Path) -> None:
    _write_shards(tmp_path, {"x": A, "y": B})
    with pytest.warns(UserWarning, match=r"does not list 1 tensor\(s\) that b\.safetensors holds, e\.g\. w"):
        files = find_checkpoint_files(tmp_path)
    assert sorted(files.weight_map) == ["x", "y"]


def test_from_pretrained_with_index_naming_the_wrong_shard_is_a_value_error(tmp_path: Path) -> None:
    write_llama_checkpoint(tmp_path, tiny_llama(tie=False), (2, 8, 8), shards=2)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.1.mlp.down_proj.codebooks"
    assert index["weight_map"][name] == "model-00002-of-00002.safetensors"
    index["weight_map"][name] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"index.json maps tensor {name} to model-00001-of-00002.safetensors"):
        from_pretrained(tmp_path)


def test_pickle_index_naming_the_wrong_shard_is_a_value_error(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(2)}, tmp_path / "a.bin")
    torch.save({"y": torch.ones(2)}, tmp_path / "b.bin")
    weight_map = {"x": "a.bin", "y": "a.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    files = find_checkpoint_files(tmp_path, allow_pickle=True)
    with open_checkpoint(files) as reader:
        assert reader.read("x").tolist() == [0.0, 0.0]
        for read in (reader.dtype_and_shape, reader.read):
            with pytest.raises(ValueError, match=r"a\.bin does not hold tensor y"):
                read("y")


def test_a_file_is_not_a_checkpoint_directory(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint directory; pass the directory"):
        find_checkpoint_files(tmp_path / "model.safetensors")


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def test_other_quant_method_is_named_before_its_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quant_method must be 'aqlm', got 'gptq': the model is quantized with 'gptq'"):
        AqlmConfig.from_dict(GPTQ)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": GPTQ}))
    for call in (AqlmConfig.from_pretrained, from_pretrained):
        with pytest.raises(ValueError, match=r"config\.json: the checkpoint is quantized with quant_method 'gptq', "):
            call(tmp_path)
    # Without quant_method, unknown keys are still typos of AQLM's keys; "aqlm" in any case still parses.
    with pytest.raises(ValueError, match="unknown key.*bits"):
        AqlmConfig.from_dict({key: value for key, value in GPTQ.items() if key != "quant_method"})
    assert AqlmConfig.from_dict({"quant_method": "AQLM", "num_codebooks": 2}).num_codebooks == 2
    with pytest.raises(ValueError, match="quant_method must be 'aqlm', got None"):
        AqlmConfig.from_dict({"quant_method": None})


class Fused(nn.Module):
    """A module with a fused weight and no Linear, substituted by two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 16, 16))


def test_a_failing_fill_leaves_the_visited_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    from aqlm_ctx import substitutions

    def fill(original: nn.Module, replacement: nn.Module) -> None:
        raise Boom("fill failed")

    substitution = substitutions.Substitution(Fused, lambda _: nn.ModuleDict({"a": nn.Linear(16, 16)}), fill=fill)
    monkeypatch.setitem(substitutions._REGISTRY, Fused, substitution)
    model = nn.Sequential(Fused(), nn.Linear(16, 16))
    state = _state(model)
    with pytest.raises(Boom, match="fill failed"):
        replace_linear_layers(model, CONFIG, skip=["0.a"])
    assert_untouched(model, state)
    assert type(model[0]) is Fused and type(model[1]) is nn.Linear


def test_a_caught_construction_error_inside_the_block_is_no_layer(before: State) -> None:
    """Model code that catches a failed ``nn.Linear(...)`` and builds something else: the block ends normally."""

    class Fallback(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(16, 16)
            try:
                self.second: nn.Module = nn.Linear(16, -8)
            except RuntimeError:
                self.second = nn.Identity()
            self.head = nn.Linear(16, 16)

    with aqlm_quantized(CONFIG, skip=["head"]):
        model = Fallback()
    assert [type(child) for child in model.children()] == [QuantizedLinear, nn.Identity, nn.Linear]
    assert_restored(before)


def test_visitor_failing_after_the_moe_substitution_leaves_the_experts() -> None:
    """A skip callable that raises once the fused experts were substituted: they are put back, real weights and all."""
    transformers = pytest.importorskip("transformers")
    from .test_moe import tiny_mixtral

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(tiny_mixtral()).eval()
    before = snapshot()  # transformers adds nn.Module.smart_apply when its first model is built
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        reference = model(ids).logits
    experts = {name: module for name, module in model.named_modules() if name.endswith("mlp.experts")}

    def fails_on(path: str, module: nn.Module) -> bool:
        if path.endswith("layers.1.self_attn.q_proj"):
            raise Boom("cannot decide")
        return False

    with pytest.raises(Boom):
        replace_linear_layers(model, CONFIG, skip=[fails_on])
    assert {name: module for name, module in model.named_modules() if name.endswith("mlp.experts")} == experts
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
    assert_restored(before)

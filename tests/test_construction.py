"""aqlm_quantized: what is built inside, skips, restoration, nesting, scope, devices and dtypes."""

from __future__ import annotations

import asyncio
import copy
import threading
import warnings

import pytest
import torch
from aqlm import QuantizedLinear
from torch import nn
from torch.nn import Linear  # bound before any block is entered, on purpose

from aqlm_ctx import AqlmConfig, aqlm_quantized, replace_linear_layers

from .utils import signature

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, hidden: int = 16, layers: int = 2, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(hidden, hidden), "fc": nn.Linear(hidden, 2 * hidden, bias=False)})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = Linear(hidden, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight


def snapshot() -> tuple[dict[str, object], dict[str, object]]:
    return dict(vars(nn.Linear)), dict(vars(nn.Module))


def assert_restored(before: tuple[dict[str, object], dict[str, object]]) -> None:
    for now, then in zip(snapshot(), before, strict=True):
        assert now.keys() == then.keys()
        assert all(now[key] is then[key] for key in then)
    plain = nn.Linear(16, 8)
    assert type(plain) is nn.Linear and plain.weight.device.type == "cpu"
    assert torch.nn.modules.module._global_module_registration_hooks == {}


def test_linear_built_inside_is_quantized_on_meta_at_once() -> None:
    before = snapshot()
    with aqlm_quantized(CONFIG):
        layer = nn.Linear(16, 32)
        aliased = Linear(16, 32, bias=False)
        assert type(layer) is QuantizedLinear and type(aliased) is QuantizedLinear
    assert (layer.in_features, layer.out_features, layer.bias is not None, aliased.bias) == (16, 32, True, None)
    assert layer.codes.shape == (32, 2, 2) and layer.codes.dtype is torch.int8
    assert layer.codebooks.shape == (2, 256, 1, 8)
    assert all(p.device.type == "meta" and not p.requires_grad for p in layer.parameters())
    assert_restored(before)


def test_rest_of_model_on_meta_and_skips_applied_at_block_end() -> None:
    before = snapshot()
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = TinyLM()
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed.weight  # the tie survives
    assert all(type(block[name]) is QuantizedLinear for block in model.layers for name in ("q", "fc"))
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert_restored(before)


def test_untied_skipped_lm_head_is_dense_meta_linear_in_built_dtype() -> None:
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = TinyLM(tie=False).to(torch.float64) if False else TinyLM(tie=False)
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight.device.type == "meta"


def test_quantized_tied_lm_head_loses_the_stray_weight() -> None:
    with aqlm_quantized(CONFIG):
        model = TinyLM(tie=True)
    assert type(model.lm_head) is QuantizedLinear
    assert set(dict(model.lm_head.named_parameters())) == {"codebooks", "codes", "scales"}
    assert model.embed.weight.shape == (32, 16)


def test_subclasses_and_multihead_attention_are_left_alone() -> None:
    class MyLinear(nn.Linear):
        pass

    with aqlm_quantized(CONFIG):
        mha = nn.MultiheadAttention(16, 2)
        sub = MyLinear(16, 16)
        lazy = nn.LazyLinear(8)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(sub) is MyLinear and type(lazy) is nn.LazyLinear
    assert mha.out_proj.weight.device.type == "meta"


def test_dtype_rules() -> None:
    with aqlm_quantized(CONFIG):
        explicit = nn.Linear(16, 16, dtype=torch.float16)
        default = nn.Linear(16, 16)
    assert explicit.codebooks.dtype is torch.float16 and explicit.scales.dtype is torch.float16
    assert default.codebooks.dtype is torch.float32 and default.codes.dtype is torch.int8
    with aqlm_quantized(CONFIG.replace(dtype=torch.bfloat16)):
        forced = nn.Linear(16, 16, dtype=torch.float16)
    assert forced.codebooks.dtype is torch.bfloat16 and forced.bias.dtype is torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with aqlm_quantized(CONFIG):
            recorded = nn.Linear(16, 16)
    finally:
        torch.set_default_dtype(previous)
    assert recorded.codebooks.dtype is torch.float64


def test_explicit_devices() -> None:
    with aqlm_quantized(CONFIG, skip=["b"]):
        model = nn.ModuleDict({"a": nn.Linear(16, 16, device="cpu"), "b": nn.Linear(16, 16, device="cpu")})
        kept = torch.zeros(3, device="cpu")
        moved = torch.zeros(3)
    assert model["a"].codes.device.type == "meta"  # no codes yet: placed when loaded
    assert model["b"].weight.device.type == "cpu"  # a skipped layer keeps the device it asked for
    assert kept.device.type == "cpu" and moved.device.type == "meta"


def test_init_on_meta_false_keeps_other_tensors_real() -> None:
    with aqlm_quantized(CONFIG, skip=["lm_head"], init_on_meta=False):
        model = TinyLM(tie=False)
    assert model.embed.weight.device.type == "cpu" and model.lm_head.weight.device.type == "cpu"
    assert model.layers[0]["q"].codes.device.type == "meta"


def test_exception_inside_restores_everything() -> None:
    before = snapshot()
    with pytest.raises(RuntimeError, match="boom"), aqlm_quantized(CONFIG):
        nn.Linear(16, 16)
        raise RuntimeError("boom")
    assert_restored(before)
    assert torch.empty(1).device.type == "cpu"


def test_exception_inside_model_init_restores_everything() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            raise KeyError("half built")

    before = snapshot()
    with pytest.raises(KeyError), aqlm_quantized(CONFIG):
        Broken()
    assert_restored(before)


def test_not_divisible_layer_names_path_source_shape_and_suggests_skip() -> None:
    before = snapshot()
    with pytest.raises(ValueError) as info, aqlm_quantized(CONFIG):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 10), nn.Linear(12, 16))
    message = str(info.value)
    assert "2 (built at" in message and "test_construction.py" in message
    assert "in_features=12 is not divisible by in_group_size=8" in message
    assert "skip" in message and "Linear(16, 10)" not in message  # out_group_size 1 divides 10
    assert_restored(before)
    with aqlm_quantized(CONFIG, skip=["2"]):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(12, 16))
    assert type(model[0]) is QuantizedLinear and type(model[2]) is nn.Linear


def test_unmatched_pattern_warns() -> None:
    with pytest.warns(UserWarning, match="lm_haed"), aqlm_quantized(CONFIG, skip=["lm_haed"]):
        TinyLM()


def test_nested_blocks_apply_inner_config_inside() -> None:
    before = snapshot()
    inner_config = AqlmConfig(num_codebooks=1, nbits_per_codebook=16)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            with aqlm_quantized(inner_config, skip=["x"]):
                self.inner = nn.ModuleDict({"x": nn.Linear(16, 16), "y": nn.Linear(16, 16)})
            self.b = nn.Linear(16, 16)

    with aqlm_quantized(CONFIG):
        model = Outer()
    assert model.a.num_codebooks == 2 and model.b.num_codebooks == 2
    assert model.inner["y"].nbits_per_codebook == 16 and type(model.inner["x"]) is nn.Linear
    assert_restored(before)


def test_same_object_reentered_and_reused() -> None:
    before = snapshot()
    context = aqlm_quantized(CONFIG)
    with context:
        with context:
            a = nn.Linear(16, 16)
        b = nn.Linear(16, 16)
    with context:
        c = nn.Linear(16, 16)
    assert all(type(layer) is QuantizedLinear for layer in (a, b, c))
    assert_restored(before)


def test_wrong_exit_order_is_refused() -> None:
    first, second = aqlm_quantized(CONFIG), aqlm_quantized(CONFIG)
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="reverse order"):
        first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    first.__exit__(None, None, None)
    assert_restored(snapshot())


def test_combines_with_torch_device_meta_and_init_empty_weights_in_any_order() -> None:
    """The same model in every order (untied: init_empty_weights itself re-creates assigned parameters)."""
    from accelerate import init_empty_weights

    before = snapshot()
    reference = None
    for order in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if order == 0:
                with torch.device("meta"), aqlm_quantized(CONFIG, skip=["lm_head"]):
                    model = TinyLM(tie=False)
            elif order == 1:
                with aqlm_quantized(CONFIG, skip=["lm_head"]), torch.device("meta"):
                    model = TinyLM(tie=False)
            elif order == 2:
                with init_empty_weights(), aqlm_quantized(CONFIG, skip=["lm_head"]):
                    model = TinyLM(tie=False)
            else:
                with aqlm_quantized(CONFIG, skip=["lm_head"]), init_empty_weights():
                    model = TinyLM(tie=False)
        reference = reference or signature(model)
        assert signature(model) == reference
    assert_restored(before)


def test_other_threads_get_ordinary_layers_while_a_block_is_open() -> None:
    entered, release = threading.Event(), threading.Event()
    results: dict[str, nn.Module] = {}

    def inside() -> None:
        with aqlm_quantized(CONFIG):
            entered.set()
            release.wait(5)
            results["inside"] = nn.Linear(16, 16)

    worker = threading.Thread(target=inside)
    worker.start()
    entered.wait(5)
    results["outside"] = nn.Sequential(nn.Linear(16, 16))
    release.set()
    worker.join()
    assert type(results["inside"]) is QuantizedLinear
    outside = results["outside"][0]
    assert type(outside) is nn.Linear and outside.weight.device.type == "cpu"
    assert_restored(snapshot())


def test_asyncio_tasks_are_isolated() -> None:
    async def build(quantized: bool) -> nn.Module:
        if quantized:
            with aqlm_quantized(CONFIG):
                await asyncio.sleep(0.01)
                return nn.Linear(16, 16)
        await asyncio.sleep(0.005)
        layer = nn.Linear(16, 16)
        await asyncio.sleep(0.01)
        return layer

    async def main() -> list[nn.Module]:
        return await asyncio.gather(build(True), build(False), build(True), build(False))

    layers = asyncio.run(main())
    assert [type(layer) for layer in layers] == [QuantizedLinear, nn.Linear, QuantizedLinear, nn.Linear]
    assert layers[1].weight.device.type == "cpu"
    assert_restored(snapshot())


def test_thread_that_dies_inside_a_block_leaves_nothing_behind() -> None:
    before = snapshot()
    worker = threading.Thread(target=lambda: aqlm_quantized(CONFIG).__enter__())
    worker.start()
    worker.join()
    assert type(nn.Linear(16, 16)) is nn.Linear
    with aqlm_quantized(CONFIG):
        pass
    assert_restored(before)


def test_threads_that_inherit_the_context_get_ordinary_layers() -> None:
    """asyncio.to_thread copies the task's context (and so the open block) into a worker thread; the worker builds
    as any other thread does: ordinary layers on the CPU, not half a block (quantized layers beside real tensors)."""

    def build() -> nn.Module:
        return nn.ModuleDict({"embed": nn.Embedding(32, 16), "proj": nn.Linear(16, 16)})

    async def main() -> tuple[nn.Module, nn.Module]:
        with aqlm_quantized(CONFIG):
            return build(), await asyncio.to_thread(build)

    same, other = asyncio.run(main())
    assert type(same["proj"]) is QuantizedLinear and same["embed"].weight.is_meta
    assert type(other["proj"]) is nn.Linear and other["proj"].weight.device.type == "cpu"
    assert other["embed"].weight.device.type == "cpu"
    assert_restored(snapshot())


class Clones(nn.Module):
    """Layers cloned with copy.deepcopy while the model is built (the Annotated Transformer's ``clones``)."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.ModuleDict({"q": nn.Linear(16, 16), "out": nn.Linear(16, 16)})
        self.layers = nn.ModuleList(copy.deepcopy(block) for _ in range(3))
        self.lm_head = nn.Linear(16, 32)


def test_deep_copies_made_inside_are_built_layers_with_their_skips() -> None:
    with aqlm_quantized(CONFIG, skip=["layers.*.out"]):
        model = Clones()
    for index in range(3):
        q, out = model.layers[index]["q"], model.layers[index]["out"]
        assert type(q) is QuantizedLinear and sorted(q._parameters) == ["bias", "codebooks", "codes", "scales"]
        assert type(out) is nn.Linear and out.weight.is_meta
        assert not any(name.startswith("_aqlm_ctx") for name in vars(q))
    assert model.layers[0]["q"].codes is not model.layers[1]["q"].codes
    assert signature(model) == signature(replace_linear_layers(Clones(), CONFIG, skip=["layers.*.out"]).to("meta"))


def test_torch_transformer_encoder_follows_the_skip_advice() -> None:
    """nn.TransformerEncoder deep-copies its layer; the README's advice for it (skip linear1 / linear2) holds."""
    with aqlm_quantized(CONFIG, skip=["linear1", "linear2"]):
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    for block in encoder.layers:
        assert type(block.linear1) is nn.Linear and type(block.linear2) is nn.Linear
        assert "weight" in block.linear1._parameters


def test_a_freed_module_does_not_hide_the_next_model_from_its_skips() -> None:
    """The block remembers attached modules by identity, not by ``id()``, which a later module may reuse."""
    for _ in range(20):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with aqlm_quantized(CONFIG, skip=["lm_head"]):
                holder = nn.Module()
                holder.act = nn.ReLU()
                holder.act = nn.GELU()  # the ReLU is freed; its id is free for the model below
                model = TinyLM(tie=False)
        assert type(model.lm_head) is nn.Linear


def test_a_temporary_container_is_not_the_model() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            proj = nn.Linear(16, 16)
            self.size = sum(p.numel() for p in nn.Sequential(proj).parameters())  # a container that is dropped
            self.proj = proj
            self.body = nn.Linear(16, 16)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with aqlm_quantized(CONFIG, skip=["proj"]):
            model = Wrapped()
    assert type(model.proj) is nn.Linear and type(model.body) is QuantizedLinear


class NanoGPT(nn.Module):
    """The embedding takes the head's weight (``wte.weight = lm_head.weight``), the other way round from TinyLM."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 32, bias=False)
        self.wte.weight = self.lm_head.weight


def test_an_embedding_tied_to_a_skipped_head_stays_tied() -> None:
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = NanoGPT()
    assert type(model.lm_head) is nn.Linear and model.wte.weight is model.lm_head.weight
    with torch.device("meta"):
        by_visitor = NanoGPT()
    assert signature(model) == signature(replace_linear_layers(by_visitor, CONFIG, skip=["lm_head"]))


def test_a_dtype_cast_inside_the_block_reaches_skipped_layers() -> None:
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = TinyLM(tie=False).to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.layers[0]["q"].codebooks.dtype == torch.bfloat16
    assert signature(model) == signature(
        replace_linear_layers(TinyLM(tie=False).to(torch.bfloat16), CONFIG, skip=["lm_head"]).to("meta")
    )


def test_layers_parametrized_while_built_are_refused() -> None:
    from torch.nn.utils import parametrizations

    for skip in ([], ["head"]):
        refused = pytest.raises(ValueError, match=r"parametrized .*\n  head \(built at .*test_construction\.py:\d+\)")
        with refused, aqlm_quantized(CONFIG, skip=skip):
            model = nn.Module()
            model.head = parametrizations.weight_norm(nn.Linear(16, 16))
    assert_restored(snapshot())


def test_a_container_made_after_the_model_does_not_take_its_skips() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with aqlm_quantized(CONFIG, skip=["lm_head"]):
            model = TinyLM(tie=False)
            assert sum(p.numel() for p in nn.Sequential(model.lm_head).parameters()) > 0
    assert type(model.lm_head) is nn.Linear and type(model.layers[0]["q"]) is QuantizedLinear


def test_a_model_built_in_a_block_can_be_saved_inside_it() -> None:
    import io
    import pickle

    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = TinyLM(tie=False)
        data = pickle.dumps(model)
    assert type(pickle.loads(data).layers[0]["q"]) is QuantizedLinear  # the model as it was when pickled
    torch.save(model, io.BytesIO())


def test_blocks_inserted_into_a_module_list_take_their_paths_from_the_model() -> None:
    """``ModuleList.insert`` writes ``_modules`` itself (no registration hook): the inserted block is no root of its
    own, so anchored patterns see its layers' full paths, as the visitor does."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.blocks = nn.ModuleList([Block()])
            self.blocks.insert(0, Block())

    for skip in (["re:fc"], ["[f]c"]):
        with aqlm_quantized(CONFIG, skip=skip):
            built = Model()
        with torch.device("meta"):
            visited = replace_linear_layers(Model(), CONFIG, skip=skip)
        assert signature(built) == signature(visited)
        assert type(built.fc) is nn.Linear and type(built.blocks[0].fc) is QuantizedLinear


def test_a_bias_shared_with_a_skipped_layer_stays_shared() -> None:
    class SharedBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)
            self.b.bias = self.a.bias

    with aqlm_quantized(CONFIG, skip=["a"]):
        built = SharedBias()
    with torch.device("meta"):
        visited = replace_linear_layers(SharedBias(), CONFIG, skip=["a"])
    assert type(built.a) is nn.Linear and type(built.b) is QuantizedLinear
    assert built.b.bias is built.a.bias
    assert signature(built) == signature(visited)


def test_build_time_code_that_initialises_every_parameter_or_resets_layers_works() -> None:
    """While the block is open a quantized layer shows model code what a Linear would: float parameters only (the
    integer codes join when the block ends), a ``reset_parameters``, and a meta forward that runs."""

    class InitEverything(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.fc = nn.Linear(16, 16)
            self.head = nn.Linear(16, 32)
            for parameter in self.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_normal_(parameter)
                else:
                    nn.init.normal_(parameter)
            self.fc.reset_parameters()
            self.width = self.head(self.fc(torch.empty(1, 16))).shape[-1]  # a dummy forward on meta

    with aqlm_quantized(CONFIG, skip=["head"]):
        built = InitEverything()
    with torch.device("meta"):
        visited = replace_linear_layers(InitEverything(), CONFIG, skip=["head"])
    assert signature(built) == signature(visited) and built.width == 32
    assert list(built.fc._parameters) == ["codebooks", "codes", "scales", "bias"]
    assert "reset_parameters" not in vars(built.fc) and "codes" not in vars(built.fc)
    assert type(built.head) is nn.Linear and "reset_parameters" not in vars(built.head)


class _ThreeTied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.b.weight = self.c.weight = self.a.weight


class _TiedCopy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = copy.deepcopy(self.a)
        self.b.weight = self.a.weight


class _ClonedTiedPairs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        pair = nn.Module()
        pair.p = nn.Linear(16, 16)
        pair.q = nn.Linear(16, 16)
        pair.q.weight = pair.p.weight
        self.blocks = nn.ModuleList([copy.deepcopy(pair) for _ in range(2)])


@pytest.mark.parametrize(
    ("make", "skip"),
    [
        (_ThreeTied, []),
        (_ThreeTied, ["a"]),  # the owner dense: b and c share codes
        (_ThreeTied, ["b", "c"]),  # the owner quantized: b and c share one dense weight
        (_ThreeTied, ["a", "c"]),
        (_TiedCopy, []),
        (_TiedCopy, ["b"]),
        (_ClonedTiedPairs, []),
        (_ClonedTiedPairs, ["q"]),
    ],
)
def test_layers_sharing_one_weight_agree_with_the_visitor_under_any_skip(
    make: type[nn.Module], skip: list[str]
) -> None:
    with aqlm_quantized(CONFIG, skip=skip):
        built = make()
    with torch.device("meta"):
        visited = replace_linear_layers(make(), CONFIG, skip=skip)
    assert signature(built) == signature(visited)
    for module in built.modules():  # no stand-in, and no codes buffer, is left behind
        assert "codes" not in module._buffers and "reset_parameters" not in vars(module)
        if type(module) is nn.Linear:
            assert not hasattr(module, "codes")


def test_to_empty_inside_the_block_moves_the_codes_too() -> None:
    class Materialised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.to_empty(device="cpu")

    with aqlm_quantized(CONFIG):
        model = Materialised()
    assert {name: tensor.device.type for name, tensor in model.named_parameters()} == dict.fromkeys(
        ["a.codebooks", "a.codes", "a.scales", "a.bias"], "cpu"
    )


def test_a_models_own_codes_buffer_is_kept_or_refused() -> None:
    """A buffer the model calls ``codes`` stays on a layer that stays dense; on a quantized layer (whose codes have
    that name) it is refused with a clear error, not taken for the codes."""

    class OwnCodes(nn.Module):
        def __init__(self, in_features: int) -> None:
            super().__init__()
            self.proj = nn.Linear(in_features, 16)
            self.proj.register_buffer("codes", torch.arange(16))

    with aqlm_quantized(CONFIG, skip=["proj"]):
        kept = OwnCodes(16)
    assert type(kept.proj) is nn.Linear and list(kept.proj._buffers) == ["codes"]
    with aqlm_quantized(CONFIG, skip=["proj"]):
        indivisible = OwnCodes(10)  # not storable in groups of 8: built as a dense Linear from the start
    assert list(indivisible.proj._buffers) == ["codes"]
    error = r"a 'codes' buffer or attribute of its own(?s:.*)\n  proj \(built at "
    with pytest.raises(ValueError, match=error), aqlm_quantized(CONFIG):
        OwnCodes(16)


def test_a_failed_block_leaves_no_stand_in_on_clones_or_tied_layers() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), aqlm_quantized(CONFIG):
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), num_layers=2, enable_nested_tensor=False)
        tied = _ThreeTied()
        raise Boom
    for module in [*encoder.modules(), *tied.modules()]:
        if isinstance(module, QuantizedLinear):
            assert list(module._parameters) == ["codebooks", "codes", "scales", "bias"]
            assert not module._buffers and "reset_parameters" not in vars(module)


def test_a_skipped_layer_tied_to_a_quantized_one_gets_an_initialised_weight() -> None:
    with aqlm_quantized(CONFIG, skip=["b", "c"], init_on_meta=False):
        model = _ThreeTied().to(torch.bfloat16).requires_grad_(False)
    assert type(model.a) is QuantizedLinear and model.b.weight is model.c.weight
    weight = model.b.weight
    assert weight.dtype == torch.bfloat16 and not weight.requires_grad and weight.device.type == "cpu"
    assert bool(torch.isfinite(weight).all()) and 0.03 < float(weight.float().std()) < 0.2  # nn.Linear's init

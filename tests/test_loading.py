"""Loading hub-format AQLM checkpoints: logits against a dense oracle and against transformers; save round trips."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numba
import pytest
import torch
import transformers
from aqlm import QuantizedLinear
from torch import nn

import aqlm_ctx
from aqlm_ctx import AqlmConfig, aqlm_quantized, from_pretrained, load_checkpoint, save_checkpoint
from aqlm_ctx.testing import random_tensors

from .hub import dequantize, encode_random, write_llama_checkpoint
from .utils import tiny_llama_config

FORMATS = {"1x16": (1, 16, 8), "2x8": (2, 8, 8), "1x8": (1, 8, 8)}
TOKENS = torch.tensor([[3, 17, 42, 7, 99, 5]])


def tiny_llama(tie: bool, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    config = tiny_llama_config(num_hidden_layers=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(autouse=True)
def one_numba_thread() -> None:
    """transformers runs aqlm's own racy numba kernel for 8-bit layers on CPU; pin it while comparing."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(threads)


CASES = [
    # format, skip form, tied, shards, storage dtype
    ("1x16", "weight", False, 1, torch.float16),
    ("1x16", "module", True, 3, torch.float32),
    ("2x8", "weight", True, 1, torch.float32),
    ("2x8", "module", False, 2, torch.float16),
    ("1x8", "weight", False, 2, torch.float32),
    ("1x8", "module", True, 1, torch.float16),
]


@pytest.mark.parametrize(("fmt", "skip_form", "tie", "shards", "dtype"), CASES)
def test_logits_match_dense_oracle_and_transformers(
    tmp_path: Path, fmt: str, skip_form: str, tie: bool, shards: int, dtype: torch.dtype
) -> None:
    dense = tiny_llama(tie)
    write_llama_checkpoint(tmp_path, dense, FORMATS[fmt], skip_form=skip_form, dtype=dtype, shards=shards)
    model = from_pretrained(tmp_path, dtype=torch.float32)
    assert type(model.lm_head) is nn.Linear
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    assert not model.training
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        ours = model(TOKENS).logits
        oracle = dense(TOKENS).logits
        torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-4)
        assert torch.equal(
            model.generate(TOKENS, max_new_tokens=4, do_sample=False),
            dense.generate(TOKENS, max_new_tokens=4, do_sample=False),
        )
        if skip_form == "module":  # transformers 5 quantizes lm_head for '.weight' lists (NaN logits): not compared
            theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
            torch.testing.assert_close(ours, theirs(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_transformers_weight_form_skip_bug_is_fixed_here(tmp_path: Path) -> None:
    dense = tiny_llama(tie=False)
    write_llama_checkpoint(tmp_path, dense, FORMATS["1x16"], skip_form="weight", dtype=torch.float32)
    with torch.no_grad():
        ours = from_pretrained(tmp_path)(TOKENS).logits
    assert torch.isfinite(ours).all()


def test_fp16_compute_close_to_fp16_oracle(tmp_path: Path) -> None:
    dense = tiny_llama(tie=False)
    write_llama_checkpoint(tmp_path, dense, FORMATS["2x8"], dtype=torch.float16)
    model = from_pretrained(tmp_path)  # the checkpoint's torch_dtype: float16
    assert model.model.embed_tokens.weight.dtype is torch.float16
    assert model.model.layers[0].mlp.up_proj.codebooks.dtype is torch.float16
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits.float(), dense(TOKENS).logits, rtol=2e-2, atol=2e-2)


def test_legacy_aqlm_block(tmp_path: Path) -> None:
    dense = tiny_llama(tie=False)
    write_llama_checkpoint(tmp_path, dense, FORMATS["2x8"], dtype=torch.float32, legacy=True)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path)(TOKENS).logits, dense(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_hand_built_skeleton_and_load_checkpoint(tmp_path: Path) -> None:
    dense = tiny_llama(tie=True)
    write_llama_checkpoint(tmp_path, dense, FORMATS["1x8"], dtype=torch.float32)
    with aqlm_quantized(AqlmConfig.from_pretrained(tmp_path)):
        model = transformers.LlamaForCausalLM(dense.config)
    assert load_checkpoint(model, tmp_path, device="cpu") is model
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, dense(TOKENS).logits, rtol=1e-4, atol=1e-4)


class OwnLM(nn.Module):
    """Not a transformers model: its own names, a non-persistent buffer computed at construction."""

    def __init__(self, vocab: int = 64, width: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"w_in": nn.Linear(width, 2 * width), "w_out": nn.Linear(2 * width, width)}) for _ in range(2)
        )
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("offset", torch.linspace(0, 1, width), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.offset
        for block in self.blocks:
            h = h + block["w_out"](torch.relu(block["w_in"](h)))
        return self.head(h)


def test_own_architecture_from_its_own_checkpoint(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    dense = OwnLM()
    tensors = {"tok.weight": dense.tok.weight.detach().clone(), "head.weight": dense.head.weight.detach().clone()}
    for index, block in enumerate(dense.blocks):
        for name, layer in block.items():
            encoded = encode_random(layer.out_features, layer.in_features, FORMATS["2x8"], generator, torch.float32)
            tensors.update({f"blocks.{index}.{name}.{k}": v for k, v in encoded.items()})
            tensors[f"blocks.{index}.{name}.bias"] = layer.bias.detach().clone()
            with torch.no_grad():
                layer.weight.copy_(dequantize(**encoded))
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "model.safetensors")
    block = {
        "quant_method": "aqlm",
        "num_codebooks": 2,
        "nbits_per_codebook": 8,
        "linear_weights_not_to_quantize": ["head.weight"],
    }
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": block}))
    model = from_pretrained(tmp_path, model_fn=OwnLM)
    assert type(model.head) is nn.Linear and type(model.blocks[0]["w_in"]) is QuantizedLinear
    torch.testing.assert_close(model.offset, dense.offset)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), rtol=1e-4, atol=1e-4)


def test_own_architecture_in_fp16_gets_its_rebuilt_buffers_in_fp16(tmp_path: Path) -> None:
    """Buffers recomputed by building the model again take the loaded dtype, as ``model.half()`` would give them."""
    config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8, skip=["head"])
    with aqlm_quantized(config, init_on_meta=False):
        model = OwnLM()
    aqlm_ctx.load_tensors(model, random_tensors(model, dtype=torch.float16))
    save_checkpoint(model.half(), tmp_path)
    loaded = from_pretrained(tmp_path, model_fn=OwnLM)
    assert loaded.tok.weight.dtype == loaded.offset.dtype == torch.float16
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_missing_tensors_are_reported_for_a_skeleton_with_real_tensors(tmp_path: Path) -> None:
    """A skeleton built with real tensors (init_on_meta=False) would silently keep a missing tensor's init."""
    config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8, skip=["head"])
    with aqlm_quantized(config):
        model = OwnLM()
    tensors = random_tensors(model)
    del tensors["head.weight"]
    with aqlm_quantized(config, init_on_meta=False):
        real = OwnLM()
    with pytest.raises(ValueError, match=r"missing from the checkpoint:\n  head\.weight"):
        aqlm_ctx.load_tensors(real, tensors)


class OwnMoE(nn.Module):
    """Its own module is called ``block_sparse_moe``, the Mixtral name that hub skip lists are renamed from."""

    def __init__(self) -> None:
        super().__init__()
        experts = {"gate": nn.Linear(32, 8, bias=False), "w1": nn.Linear(32, 32)}
        self.layers = nn.ModuleList([nn.ModuleDict({"block_sparse_moe": nn.ModuleDict(experts)})])


def test_skip_lists_are_renamed_only_for_models_that_declare_the_rename(tmp_path: Path) -> None:
    config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8, skip=["gate"])
    with aqlm_quantized(config):
        model = OwnMoE()
    aqlm_ctx.load_tensors(model, random_tensors(model))
    save_checkpoint(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = from_pretrained(tmp_path, model_fn=OwnMoE)
    moe = loaded.layers[0]["block_sparse_moe"]
    assert type(moe["gate"]) is nn.Linear and type(moe["w1"]) is QuantizedLinear
    assert torch.equal(moe["gate"].weight, model.layers[0]["block_sparse_moe"]["gate"].weight)


@pytest.mark.parametrize("max_shard_size", ["5GB", 20_000])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, max_shard_size: int | str) -> None:
    dense = tiny_llama(tie=True)
    write_llama_checkpoint(tmp_path / "hub", dense, FORMATS["2x8"], dtype=torch.float16)
    model = from_pretrained(tmp_path / "hub")
    with torch.no_grad():
        model(TOKENS)  # CPU inference must not change what is saved
    files = save_checkpoint(model, tmp_path / "copy", max_shard_size=max_shard_size)
    assert (len(files) > 3) == (max_shard_size != "5GB")
    again = from_pretrained(tmp_path / "copy")
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) and before[key].dtype == after[key].dtype for key in before)
    original = json.loads((tmp_path / "hub" / "config.json").read_text())["quantization_config"]
    saved = json.loads((tmp_path / "copy" / "config.json").read_text())["quantization_config"]
    assert {k: saved[k] for k in original if k != "linear_weights_not_to_quantize"} == {
        k: v for k, v in original.items() if k != "linear_weights_not_to_quantize"
    }
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(model, tmp_path / "copy")


def test_saved_codes_are_in_checkpoint_layout_after_aqlm_cpu_inference(tmp_path: Path) -> None:
    dense = tiny_llama(tie=False)
    write_llama_checkpoint(tmp_path / "hub", dense, FORMATS["2x8"], dtype=torch.float32)
    model = from_pretrained(tmp_path / "hub")
    layer = model.model.layers[0].mlp.down_proj  # 64 x 128: aqlm permutes its codes to [16, 64, 2]
    expected = layer.codes.detach().clone()
    layer.gemv_op = None  # let aqlm choose its own kernel, as transformers' models do
    with torch.no_grad():
        layer(torch.randn(1, 128))
    assert layer.codes.shape != expected.shape
    save_checkpoint(model, tmp_path / "copy")
    assert torch.equal(from_pretrained(tmp_path / "copy").model.layers[0].mlp.down_proj.codes, expected)


def test_summary_and_inspect_counts(tmp_path: Path) -> None:
    dense = tiny_llama(tie=False)
    write_llama_checkpoint(tmp_path, dense, FORMATS["2x8"], dtype=torch.float16)
    summary = aqlm_ctx.summarize(from_pretrained(tmp_path))
    assert summary.quantized_layers == 14 and summary.dense_linear_layers == 1
    layers = [m for m in from_pretrained(tmp_path).modules() if isinstance(m, QuantizedLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.in_features * m.out_features * 2 + 2 * 256 * 8 * 16 + m.out_features * 16 for m in layers)
    assert summary.bits_per_weight == pytest.approx(bits / weights)
    assert summary.compression > 1


def test_saving_over_the_checkpoint_a_model_was_loaded_from(tmp_path: Path) -> None:
    """Loaded codes may map the checkpoint file: overwriting it must not change (or crash) the loaded model."""
    dense = tiny_llama(tie=False)
    write_llama_checkpoint(tmp_path, dense, FORMATS["2x8"], dtype=torch.float32)
    model = from_pretrained(tmp_path)
    with torch.no_grad():
        before = model(TOKENS).logits
    save_checkpoint(model, tmp_path, overwrite=True)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, before)
        assert torch.equal(from_pretrained(tmp_path)(TOKENS).logits, before)
    assert not list(tmp_path.glob(".*.tmp"))


def test_recomputing_buffers_leaves_what_was_loaded_in_submodules(tmp_path: Path) -> None:
    """CLIP's ``_init_weights`` on its embeddings module (owner of the non-persistent ``position_ids``) also draws
    the token and patch embeddings it holds: reloading must keep the checkpoint's values."""
    from safetensors.torch import load_file

    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    with aqlm_quantized(AqlmConfig(num_codebooks=2, nbits_per_codebook=8)):
        model = transformers.CLIPModel(config)
    aqlm_ctx.load_tensors(model, random_tensors(model), dtype=torch.float32)
    save_checkpoint(model, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path, dtype=torch.float32)
    state = loaded.state_dict()
    assert [name for name, tensor in stored.items() if not torch.equal(state[name], tensor)] == []
    assert torch.equal(loaded.text_model.embeddings.position_ids, model.text_model.embeddings.position_ids)


def test_bias_entries_of_the_converters_skip_list_keep_their_layers_quantized(tmp_path: Path) -> None:
    """AQLM's converter lists every parameter but the quantized weights in ``linear_weights_not_to_quantize``, the
    biases of quantized q/k/v projections (Qwen2) included: those layers stay quantized, their biases load."""
    qwen2 = transformers.Qwen2Config(**{**tiny_llama_config().to_dict(), "model_type": "qwen2"})
    with aqlm_quantized(AqlmConfig(num_codebooks=2, nbits_per_codebook=8), skip=["lm_head"]):
        model = transformers.Qwen2ForCausalLM(qwen2)
    aqlm_ctx.load_tensors(model, random_tensors(model), dtype=torch.float32)
    save_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    skip = config["quantization_config"]["linear_weights_not_to_quantize"]
    biases = [name for name, _ in model.named_parameters() if name.endswith("_proj.bias")]
    assert biases and isinstance(model.get_submodule(biases[0][: -len(".bias")]), QuantizedLinear)
    config["quantization_config"]["linear_weights_not_to_quantize"] = [*skip, *biases]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bias entries match their modules: no "matched no module" warning
        loaded = from_pretrained(tmp_path, dtype=torch.float32)
    assert all(isinstance(loaded.get_submodule(name[: -len(".bias")]), QuantizedLinear) for name in biases)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    from aqlm_ctx.cli import inspect_checkpoint

    assert inspect_checkpoint(tmp_path)["skip_unmatched"] == []


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}])
def test_a_device_map_naming_one_device_puts_everything_there(tmp_path: Path, device_map: object) -> None:
    write_llama_checkpoint(tmp_path, tiny_llama(tie=False), FORMATS["2x8"])
    model = from_pretrained(tmp_path, device_map=device_map)
    assert {tensor.device.type for tensor in [*model.parameters(), *model.buffers()]} == {"cpu"}


def test_config_dtype_keys(tmp_path: Path) -> None:
    """transformers 5 writes only ``dtype``; where ``torch_dtype`` is there too, it is the one its writer meant."""
    write_llama_checkpoint(tmp_path, tiny_llama(tie=False), FORMATS["2x8"])
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert from_pretrained(tmp_path).model.embed_tokens.weight.dtype == torch.bfloat16
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "float16"}))
    assert from_pretrained(tmp_path).model.embed_tokens.weight.dtype == torch.float16


def test_linear_subclasses_that_the_checkpoint_quantized_load_quantized(tmp_path: Path) -> None:
    """transformers' integration quantizes every ``isinstance(m, nn.Linear)``, Falcon's ``FalconLinear`` too:
    from_pretrained quantizes the subclass layers the checkpoint holds codes for; load_checkpoint names them."""
    import transformers.quantizers  # transformers 5.24 needs it imported before its aqlm integration
    from transformers.integrations.aqlm import replace_with_aqlm_linear as transformers_replace

    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
    with torch.device("meta"):
        theirs = transformers.FalconForCausalLM(config)
    transformers_replace(
        theirs,
        modules_to_not_convert=["lm_head"],
        quantization_config=transformers.AqlmConfig(num_codebooks=2, nbits_per_codebook=8),
    )
    aqlm_ctx.load_tensors(theirs, random_tensors(theirs), dtype=torch.float32).eval()
    save_checkpoint(theirs, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded.transformer.h[0].self_attention.query_key_value) is QuantizedLinear
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits)
    with aqlm_quantized(AqlmConfig.from_pretrained(tmp_path)):
        skeleton = transformers.FalconForCausalLM(config)
    with pytest.raises(ValueError, match=r"query_key_value \(FalconLinear\).*subclasses of nn\.Linear"):
        load_checkpoint(skeleton, tmp_path)

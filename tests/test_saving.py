"""save_checkpoint: overwriting (stale weight files, failed writes, files it would replace), the skip list transformers
4 and 5 both read, and codes whose in-place permutation by aqlm's CPU kernel the shape alone does not reveal."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numba
import pytest
import torch
import transformers
from aqlm import QuantizedLinear
from torch import nn

import aqlm_ctx
import aqlm_ctx.checkpoint
from aqlm_ctx import AqlmConfig, aqlm_quantized, from_pretrained, save_checkpoint
from aqlm_ctx.cli import inspect_checkpoint
from aqlm_ctx.testing import random_tensors

from .hub import write_llama_checkpoint
from .utils import tiny_llama_config

CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
IDS = torch.tensor([[1, 2, 3]])


@pytest.fixture(autouse=True)
def one_numba_thread() -> Iterator[None]:
    """aqlm's own numba kernel races with several threads; pin it wherever it runs."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(threads)


def llama(seed: int = 0, tie: bool = False) -> transformers.LlamaForCausalLM:
    """A tiny 2x8 Llama (lm_head dense) with random tensors."""
    config = tiny_llama_config(tie_word_embeddings=tie)
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = transformers.LlamaForCausalLM(config)
    return aqlm_ctx.load_tensors(model, random_tensors(model, seed=seed)).eval()


def listing(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in directory.iterdir()}


# ---------------------------------------------------------------------------------------------------------------
# Bug 1: an overwrite leaves no weight file of the old checkpoint behind, and a failed one leaves the old intact.


def test_overwrite_single_file_with_shards_removes_the_stale_single_file(tmp_path: Path) -> None:
    old, new = llama(seed=0), llama(seed=1)
    save_checkpoint(old, tmp_path)
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "model-notes.safetensors.txt").write_text("mine too")
    files = save_checkpoint(new, tmp_path, overwrite=True, max_shard_size=20_000)
    shards = [name for name in listing(tmp_path) if name.startswith("model-0")]
    assert len(shards) > 1
    assert listing(tmp_path) == sorted(
        [
            *shards,
            "model.safetensors.index.json",
            "config.json",
            "generation_config.json",
            "README.md",
            "model-notes.safetensors.txt",
        ]
    )
    assert sorted(file.name for file in files) == sorted(
        [*shards, "model.safetensors.index.json", "config.json", "generation_config.json"]
    )
    assert (tmp_path / "README.md").read_text() == "mine"
    with torch.no_grad():
        expected = new(IDS).logits
        torch.testing.assert_close(from_pretrained(tmp_path)(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert torch.equal(theirs.model.embed_tokens.weight, new.model.embed_tokens.weight)
        assert torch.equal(theirs.model.layers[0].mlp.up_proj.codes, new.model.layers[0].mlp.up_proj.codes)


def test_overwrite_shards_with_a_single_file_removes_the_stale_shards_and_index(tmp_path: Path) -> None:
    old, new = llama(seed=0), llama(seed=1)
    save_checkpoint(old, tmp_path, max_shard_size=20_000)
    # an index may name shards any way it likes: those files belong to the old checkpoint too
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.replace(tmp_path / first, tmp_path / "weights-a.safetensors")
    index["weight_map"] = {k: "weights-a.safetensors" if v == first else v for k, v in index["weight_map"].items()}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "unrelated.safetensors").write_bytes(b"not listed anywhere")
    save_checkpoint(new, tmp_path, overwrite=True)
    assert listing(tmp_path) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "unrelated.safetensors",
    ]
    loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded.model.embed_tokens.weight, new.model.embed_tokens.weight)


def test_failed_overwrite_leaves_the_old_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = llama(seed=0)
    save_checkpoint(old, tmp_path, max_shard_size=20_000)
    before = snapshot(tmp_path)
    real_save_file = aqlm_ctx.checkpoint.save_file
    calls = []

    def disk_full_on_second_shard(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save_file(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(aqlm_ctx.checkpoint, "save_file", disk_full_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(llama(seed=1), tmp_path, overwrite=True, max_shard_size=5_000)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # nothing replaced, nothing removed, no temporary files left
    assert torch.equal(from_pretrained(tmp_path).model.embed_tokens.weight, old.model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------------------------
# Bug 2: without overwrite, no existing file is replaced (generation_config.json included).


def test_existing_generation_config_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text('{"max_new_tokens": 77}')
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"generation_config\.json.*overwrite=True"):
        save_checkpoint(llama(), tmp_path)
    assert listing(tmp_path) == ["README.md", "generation_config.json"]
    assert (tmp_path / "generation_config.json").read_text() == '{"max_new_tokens": 77}'
    save_checkpoint(llama(), tmp_path, overwrite=True)
    assert json.loads((tmp_path / "generation_config.json").read_text()).get("max_new_tokens") != 77
    assert (tmp_path / "README.md").read_text() == "mine"


def test_existing_shard_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"model-00001-of-00002\.safetensors"):
        save_checkpoint(llama(), tmp_path, max_shard_size=20_000)
    assert listing(tmp_path) == ["model-00001-of-00002.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# Bug 3: the skip list names each dense module as a parameter (transformers 4) and as a module (transformers 5).


@pytest.mark.parametrize("tie", [False, True])
def test_skip_list_has_both_forms_and_transformers_reads_the_checkpoint(tmp_path: Path, tie: bool) -> None:
    model = llama(tie=tie)
    save_checkpoint(model, tmp_path)
    skip = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["linear_weights_not_to_quantize"]
    dense = ["model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"]
    dense += ["model.norm", "lm_head"]
    assert sorted(skip) == sorted([*dense, *(f"{name}.weight" for name in dense)])
    # transformers 4 keeps a Linear dense when "<path>.weight" is listed; transformers 5 matches module paths
    assert all(f"{path}.weight" in skip for path, m in model.named_modules() if type(m) is nn.Linear)
    assert "lm_head" in skip
    ours = from_pretrained(tmp_path)
    assert type(ours.lm_head) is nn.Linear
    assert sum(isinstance(m, QuantizedLinear) for m in ours.modules()) == 7
    report = inspect_checkpoint(tmp_path)
    assert report["skip_unmatched"] == [] and report["quantized_layers"] == 7
    with torch.no_grad():
        expected = model(IDS).logits
        torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert type(theirs.lm_head) is nn.Linear
        torch.testing.assert_close(theirs(IDS).logits, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Bug 4: square codes (as many input as output groups) after aqlm's own CPU kernel permuted them in place.


class Square(nn.Module):
    """Linear(256, 32) in 2x8 g8: codes [32, 32, 2], the shape the in-place permutation keeps."""

    def __init__(self, in_features: int = 256, out_features: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def square(config: AqlmConfig = CONFIG, in_features: int = 256, out_features: int = 32) -> Square:
    with aqlm_quantized(config):
        model = Square(in_features, out_features)
    return aqlm_ctx.load_tensors(model, random_tensors(model))


def test_square_codes_permuted_by_aqlm_cpu_kernel_are_saved_in_checkpoint_layout(tmp_path: Path) -> None:
    model = square()
    expected = model.proj.codes.detach().clone()
    assert expected.shape == (32, 32, 2)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)  # aqlm_ctx's kernel: codes untouched
    save_checkpoint(model, tmp_path / "before")
    assert torch.equal(from_pretrained(tmp_path / "before", model_fn=Square).proj.codes, expected)
    model.proj.gemv_op = None  # aqlm chooses its own kernel, as in a model transformers loaded
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.proj.codes, expected.permute(1, 0, 2))  # the trap: permuted in place, same shape
    save_checkpoint(model, tmp_path / "after")
    again = from_pretrained(tmp_path / "after", model_fn=Square)
    assert torch.equal(again.proj.codes, expected)
    with torch.no_grad():
        assert torch.equal(again(x), reference)


def test_square_codes_of_a_transformers_model_after_cpu_inference(tmp_path: Path) -> None:
    # q/k/v_proj: Linear(256, 32), square 2x8 g8 codes
    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_key_value_heads=4, head_dim=8)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    written = write_llama_checkpoint(tmp_path / "hub", dense, (2, 8, 8), skip_form="module", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hub", dtype=torch.float32).eval()
    with torch.no_grad():
        reference = theirs(IDS).logits
    save_checkpoint(theirs, tmp_path / "copy")
    again = from_pretrained(tmp_path / "copy")
    for name in ("q_proj", "k_proj", "v_proj"):
        codes = getattr(again.model.layers[0].self_attn, name).codes
        assert torch.equal(codes, written[f"model.layers.0.self_attn.{name}.codes"])
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, reference, rtol=1e-4, atol=1e-4)


def test_square_16_bit_codes_are_never_permuted(tmp_path: Path) -> None:
    model = square(AqlmConfig(num_codebooks=1, nbits_per_codebook=16), in_features=128, out_features=16)
    expected = model.proj.codes.detach().clone()
    assert expected.shape == (16, 16, 1)
    model.proj.gemv_op = None
    with torch.no_grad():
        model(torch.randn(1, 128))  # aqlm's dequantize kernel: leaves 16-bit codes alone
    save_checkpoint(model, tmp_path)
    assert torch.equal(from_pretrained(tmp_path, model_fn=lambda: Square(128, 16)).proj.codes, expected)


def test_square_codes_under_aqlm_generic_kernel_are_an_error(tmp_path: Path) -> None:
    """aqlm's dequantize kernel runs on CPU (codes permuted) and CUDA (not): nothing tells which, so no guess."""
    from aqlm.inference import _get_autograd_matmul_op
    from aqlm.inference_kernels.dequantization import dequantize_gemm

    model = square()
    model.proj.gemv_op = model.proj.gemm_op = _get_autograd_matmul_op(dequantize_gemm, None)
    with pytest.raises(ValueError, match=r"cannot tell the layout of proj\.codes \[32, 32, 2\]"):
        save_checkpoint(model, tmp_path)
    assert listing(tmp_path) == []


class Scaled(nn.Module):
    """A module with a weight of its own that also holds a linear layer; the root has a weight too."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(16))
        self.block = nn.Module()
        self.block.weight = nn.Parameter(torch.ones(16))
        self.block.fc = nn.Linear(16, 16)


def test_skip_list_names_no_module_that_holds_quantized_layers(tmp_path: Path) -> None:
    with aqlm_quantized(CONFIG):
        model = Scaled()
    aqlm_ctx.load_tensors(model, random_tensors(model))
    save_checkpoint(model, tmp_path)
    skip = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["linear_weights_not_to_quantize"]
    assert skip == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = aqlm_ctx.from_pretrained(tmp_path, model_fn=Scaled)
    assert type(loaded.block.fc) is QuantizedLinear and torch.equal(loaded.block.weight, model.block.weight)


class SameNames(nn.Module):
    """A dense top-level ``proj`` beside quantized ``blocks.N.proj`` (a suffix "proj" would skip those too)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(16, 16)}) for _ in range(2))
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["proj"](x)
        return self.proj(x)


def test_skip_list_names_a_dense_layer_exactly_where_its_name_ends_quantized_paths(tmp_path: Path) -> None:
    with aqlm_quantized(CONFIG, skip=["re:proj"]):
        model = SameNames()
    assert type(model.proj) is nn.Linear and type(model.blocks[0]["proj"]) is QuantizedLinear
    aqlm_ctx.load_tensors(model, random_tensors(model))
    save_checkpoint(model, tmp_path)
    skip = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["linear_weights_not_to_quantize"]
    assert skip == ["re:proj"]
    loaded = from_pretrained(tmp_path, model_fn=SameNames)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("size", [0, "0GB", "0B", "0.1B", "-1MB", "5XB"])
def test_max_shard_size_must_be_positive(tmp_path: Path, size: int | str) -> None:
    with pytest.raises(ValueError, match=r"max_shard_size must be a positive byte count .*got"):
        save_checkpoint(llama(), tmp_path, max_shard_size=size)
    assert not tmp_path.joinpath("config.json").exists()


def test_a_quantized_output_embedding_is_written_untied(tmp_path: Path) -> None:
    """A tied Llama whose lm_head is quantized: it holds codes, so the checkpoint says untied, and transformers
    (which would tie a weight onto the quantized layer) reads it."""
    with aqlm_quantized(CONFIG):
        model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert type(model.lm_head) is QuantizedLinear
    aqlm_ctx.load_tensors(model, random_tensors(model)).eval()
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.equal(from_pretrained(tmp_path)(IDS).logits, expected)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        torch.testing.assert_close(theirs(IDS).logits, expected)


def test_codebooks_in_another_dtype_than_the_dense_layers_load_with_the_same_values(tmp_path: Path) -> None:
    """``AqlmConfig(dtype=float16)`` on a float32 model: torch_dtype is one that holds both exactly."""
    with aqlm_quantized(CONFIG.replace(dtype=torch.float16), skip=["2"]):
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    aqlm_ctx.load_tensors(model, random_tensors(model))
    assert model[0].codebooks.dtype == torch.float16 and model[2].weight.dtype == torch.float32
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    loaded = from_pretrained(tmp_path, model_fn=lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)))
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor.double(), original[name].double()), name
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_untied_output_embeddings_keep_the_other_declared_ties_readable(tmp_path: Path) -> None:
    """BERT's quantized MLM decoder: with ``tie_word_embeddings: false`` transformers ties none of the declared
    pairs, so the decoder bias (stored once, tied to ``cls.predictions.bias``) is written under both names."""
    from safetensors.torch import load_file

    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, vocab_size=128
    )
    with aqlm_quantized(CONFIG):
        model = transformers.BertForMaskedLM(config)
    assert type(model.cls.predictions.decoder) is QuantizedLinear
    aqlm_ctx.load_tensors(model, random_tensors(model)).eval()
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    save_checkpoint(model, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert torch.equal(stored["cls.predictions.decoder.bias"], stored["cls.predictions.bias"])
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.equal(from_pretrained(tmp_path)(IDS).logits, expected)
        theirs = transformers.BertForMaskedLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        torch.testing.assert_close(theirs(IDS).logits, expected)

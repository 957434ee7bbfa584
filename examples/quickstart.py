"""aqlm_ctx in one minute: build a Llama as an AQLM model, write an AQLM checkpoint, load it and generate.

Run with ``make demo`` (or ``python examples/quickstart.py``). Everything is offline and on the CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import aqlm_ctx
from aqlm_ctx import AqlmConfig, aqlm_quantized, from_pretrained, load_tensors, save_checkpoint, summarize
from aqlm_ctx.testing import random_tensors

LLAMA = LlamaConfig(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=8000,
    tie_word_embeddings=False,
)
CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)  # 2x8 g8: 2 bits per weight in codes


def build() -> LlamaForCausalLM:
    """1. Build under the context: every nn.Linear comes out as aqlm.QuantizedLinear, everything on meta."""
    start = time.perf_counter()
    with aqlm_quantized(CONFIG, skip=["lm_head"]):
        model = LlamaForCausalLM(LLAMA)
    seconds = time.perf_counter() - start
    replaced = [name for name, module in model.named_modules() if type(module).__name__ == "QuantizedLinear"]
    summary = summarize(model)
    layers = LLAMA.num_hidden_layers
    print(f"[build] {layers}-layer Llama under aqlm_quantized({CONFIG.format_name}) in {seconds * 1e3:.0f} ms")
    print(f"        QuantizedLinear layers: {len(replaced)} ({replaced[0]}, ...); kept dense: lm_head")
    print(f"        parameters: {summary.parameters / 1e6:.1f} M, all on {next(model.parameters()).device}")
    print(
        f"        storage once loaded: {summary.bytes / 2**20:.1f} MiB vs {summary.dense_bytes / 2**20:.1f} MiB in "
        f"fp16 ({summary.compression:.1f}x smaller, {summary.bits_per_weight:.2f} bits per quantized weight)"
    )
    return model


def write_checkpoint(model: LlamaForCausalLM, directory: Path) -> None:
    """2. Fill the skeleton with random codes and write it in the hub's AQLM format."""
    load_tensors(model, random_tensors(model, seed=0), dtype=torch.float16)
    files = save_checkpoint(model, directory)
    size = sum(file.stat().st_size for file in files)
    print(f"[save]  {directory.name}/: {', '.join(file.name for file in files)} ({size / 2**20:.1f} MiB)")


def load_and_generate(directory: Path) -> None:
    """3. Load it back like a hub checkpoint and run it on the CPU."""
    start = time.perf_counter()
    model = from_pretrained(directory, dtype=torch.float32)
    load_seconds = time.perf_counter() - start
    prompt = torch.tensor([[1, 306, 4966, 304]])
    with torch.no_grad():
        logits = model(prompt).logits  # the first forward compiles the CPU kernel once (cached on disk)
        start = time.perf_counter()
        output = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - prompt.shape[1]
    summary = summarize(model)
    print(
        f"[load]  from_pretrained in {load_seconds:.2f} s: {summary.quantized_layers} quantized layers, "
        f"{summary.dense_linear_layers} dense, {summary.bits_per_weight:.2f} bits/weight"
    )
    print(f"[run]   logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
    print(f"[run]   greedy ids: {output[0].tolist()}")
    print(f"[run]   {new_tokens} tokens in {seconds:.2f} s = {new_tokens / seconds:.1f} tokens/s (CPU, fp32)")


def main() -> None:
    print(f"aqlm_ctx {aqlm_ctx.__version__}, torch {torch.__version__}")
    model = build()
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "tiny-llama-aqlm-2x8"
        write_checkpoint(model, directory)
        load_and_generate(directory)


if __name__ == "__main__":
    main()

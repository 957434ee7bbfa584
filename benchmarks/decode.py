"""End-to-end decode speed of a whole 7B-shaped Llama with random weights: fp16 against AQLM formats.

Every variant is a ``transformers.LlamaForCausalLM`` (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab
32000). The fp16 model is dense; each AQLM model is built with ``aqlm_quantized`` (lm_head dense, as in hub
checkpoints), filled with :func:`aqlm_ctx.testing.random_tensors` and run through aqlm_ctx's kernels. One decode step
(batch 1, one new token, a static KV cache holding ``--context`` tokens) is timed eagerly and replayed from a CUDA
graph; tokens/s = 1 / step time. Usage (on a CUDA machine, aqlm installed)::

    PYTHONPATH=. AQ_USE_JIT=0 python benchmarks/decode.py --out benchmarks/results/decode_h100.json
    python benchmarks/decode.py --tiny --device cpu   # a two-layer model, to check the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from aqlm_ctx import AqlmConfig, aqlm_quantized, load_tensors
from aqlm_ctx.testing import random_tensors

FORMATS = {"2x8": (2, 8), "1x8": (1, 8), "1x16": (1, 16)}


def llama_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1000)  # fmt: skip
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip


def dense_model(config: LlamaConfig, device: str) -> torch.nn.Module:
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float16)
    return model.eval()


def aqlm_model(config: LlamaConfig, fmt: str, device: str) -> torch.nn.Module:
    num_codebooks, nbits = FORMATS[fmt]
    with aqlm_quantized(AqlmConfig(num_codebooks=num_codebooks, nbits_per_codebook=nbits), skip=["lm_head"]):
        model = LlamaForCausalLM(config)
    load_tensors(model, random_tensors(model, dtype=torch.float16), device=device, dtype=torch.float16)
    return model.eval()


def static_cache(config: LlamaConfig, length: int, device: str) -> StaticCache:
    try:
        cache = StaticCache(config=config, max_cache_len=length)
    except TypeError:  # transformers 4.x
        cache = StaticCache(config=config, max_batch_size=1, max_cache_len=length, device=device, dtype=torch.float16)
    return cache


def decode_step(
    model: torch.nn.Module, config: LlamaConfig, context: int, room: int, device: str
) -> Callable[[], torch.Tensor]:
    """One decode step with fixed input buffers, after a prefill of ``context`` random tokens; the cache has
    ``room`` free positions for the steps."""
    gen = torch.Generator().manual_seed(0)
    cache = static_cache(config, context + room, device)
    prompt = torch.randint(0, config.vocab_size, (1, context), generator=gen).to(device)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache)
    ids = torch.randint(0, config.vocab_size, (1, 1), generator=gen).to(device)

    def step() -> torch.Tensor:
        # The cache advances one position per eager step; a captured graph replays the position it was captured at.
        with torch.no_grad():
            return model(input_ids=ids, past_key_values=cache).logits

    return step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def eager_seconds(step: Callable[[], torch.Tensor], device: str, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_seconds(step: Callable[[], torch.Tensor], repeats: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(model: torch.nn.Module, config: LlamaConfig, args: argparse.Namespace) -> dict[str, Any]:
    step = decode_step(model, config, args.context, 3 * args.repeats + 16, args.device)
    logits = step()
    result: dict[str, Any] = {"logits_finite": bool(torch.isfinite(logits).all())}
    seconds = eager_seconds(step, args.device, args.repeats)
    result.update(eager_ms=seconds * 1e3, eager_tokens_per_s=1 / seconds)
    if args.device.startswith("cuda") and not args.eager_only:
        try:
            seconds = graph_seconds(step, args.repeats)
            result.update(graph_ms=seconds * 1e3, graph_tokens_per_s=1 / seconds)
        except Exception as exc:  # report, keep the eager numbers
            result["graph_error"] = f"{type(exc).__name__}: {exc}"[:400]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="2x8,1x8,1x16")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model, to check the script")
    parser.add_argument("--eager-only", action="store_true", help="no CUDA graphs")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    config = llama_config(args.tiny)
    info: dict[str, Any] = {"context": args.context, "config": "tiny" if args.tiny else "llama-2-7b-shaped"}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    info["torch"] = torch.__version__
    results: dict[str, Any] = {}
    model = dense_model(config, args.device)
    results["fp16"] = measure(model, config, args)
    print("fp16", results["fp16"], flush=True)
    del model
    for fmt in args.formats.split(","):
        model = aqlm_model(config, fmt, args.device)
        results[fmt] = measure(model, config, args)
        for mode in ("eager", "graph"):
            if f"{mode}_ms" in results[fmt] and f"{mode}_ms" in results["fp16"]:
                results[fmt][f"{mode}_speedup_vs_fp16"] = results["fp16"][f"{mode}_ms"] / results[fmt][f"{mode}_ms"]
        print(fmt, results[fmt], flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    info["results"] = results
    text = json.dumps(info, indent=1)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()

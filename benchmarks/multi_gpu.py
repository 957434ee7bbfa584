"""Load a 2-bit ~7B-shaped synthetic checkpoint across two GPUs and check it against a single-GPU load.

Builds a Llama-2-7B-shaped 2x8 g8 checkpoint (fp16 on disk) with random codes, loads it once on ``cuda:0`` and once
with ``device_map="auto"`` and a ``max_memory`` that forces the layers onto two GPUs, and compares the logits.
Writes ``benchmarks/results/multi_gpu.json`` (or ``$OUT/multi_gpu.json`` when ``OUT`` is set).

    python benchmarks/multi_gpu.py [--layers 32] [--directory /tmp/aqlm-7b-2x8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import aqlm_ctx
from aqlm_ctx import AqlmConfig, aqlm_quantized, load_tensors, save_checkpoint
from aqlm_ctx.testing import random_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--directory", type=Path, default=Path(tempfile.gettempdir()) / "aqlm-7b-2x8")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs two GPUs, found {torch.cuda.device_count()}")
    llama = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)
    start = time.perf_counter()
    if not (args.directory / "config.json").is_file():
        with aqlm_quantized(config, skip=["lm_head"]):
            model = LlamaForCausalLM(llama)
        load_tensors(model, random_tensors(model), dtype=torch.float16)
        save_checkpoint(model, args.directory, max_shard_size="2GB")
        del model
    make_seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in args.directory.glob("*.safetensors"))
    ids = torch.arange(1, 17).unsqueeze(0)

    start = time.perf_counter()
    single = aqlm_ctx.from_pretrained(args.directory, device="cuda:0")
    single_load = time.perf_counter() - start
    with torch.no_grad():
        reference = single(ids.cuda()).logits.float().cpu()
        reference_ids = single.generate(ids.cuda(), max_new_tokens=8, do_sample=False).cpu()
    del single
    torch.cuda.empty_cache()

    # About a third of the model fits on GPU 0; the rest must go to GPU 1.
    max_memory = {0: f"{size / 3 / 2**30:.2f}GiB", 1: "70GiB", "cpu": "100GiB"}
    start = time.perf_counter()
    split = aqlm_ctx.from_pretrained(args.directory, device_map="auto", max_memory=max_memory)
    split_load = time.perf_counter() - start
    devices = Counter(str(p.device) for p in split.parameters())
    with torch.no_grad():
        logits = split(ids.cuda(0)).logits.float().cpu()
        split_ids = split.generate(ids.cuda(0), max_new_tokens=8, do_sample=False).cpu()
    result = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "layers": args.layers,
        "checkpoint_bytes": size,
        "make_checkpoint_seconds": make_seconds,
        "single_gpu_load_seconds": single_load,
        "device_map_load_seconds": split_load,
        "max_memory": max_memory,
        "parameters_per_device": dict(devices),
        "hf_device_map_devices": sorted({str(v) for v in getattr(split, "hf_device_map", {}).values()}),
        "max_abs_logit_difference": float((logits - reference).abs().max()),
        "logits_equal": bool(torch.equal(logits, reference)),
        "greedy_ids_equal": bool(torch.equal(split_ids, reference_ids)),
    }
    print(json.dumps(result, indent=2))
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu.json").write_text(json.dumps(result, indent=2))
    if len(devices) < 2 or result["max_abs_logit_difference"] > 1e-2 or not result["greedy_ids_equal"]:
        raise SystemExit("multi-GPU load does not match the single-GPU load")


if __name__ == "__main__":
    main()

"""Checkpoint -> model ready on CPU (float32), and -> first 8-token forward done: aqlm_ctx vs transformers.

Builds synthetic hub-format checkpoints of a TinyLlama-1.1B-shaped model (1x16 g8 and 2x8 g8, fp16 on disk) once
under ``benchmarks/results/load_checkpoints/`` (ignored by git), then times each step in fresh processes. Results go
to ``benchmarks/results/load.json`` and BENCHMARKS.md.

    python benchmarks/load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CHECKPOINTS = HERE / "results" / "load_checkpoints"
RESULTS = HERE / "results" / "load.json"
TINYLLAMA = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
    tie_word_embeddings=False,
)
FORMATS = {"1x16": dict(num_codebooks=1, nbits_per_codebook=16), "2x8": dict(num_codebooks=2, nbits_per_codebook=8)}


def make_checkpoint(fmt: str) -> Path:
    directory = CHECKPOINTS / f"tinyllama-{fmt}"
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aqlm_ctx import AqlmConfig, aqlm_quantized, load_tensors, save_checkpoint
    from aqlm_ctx.testing import random_tensors

    with aqlm_quantized(AqlmConfig(**FORMATS[fmt]), skip=["lm_head"]):
        model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA))
    load_tensors(model, random_tensors(model), dtype=torch.float16)
    save_checkpoint(model, directory)
    # The hub's form of the skip list: parameter names only (save_checkpoint also writes module names, which
    # transformers 5 matches; hub checkpoints do not have them, and make_module_skip_variant adds them).
    config = json.loads((directory / "config.json").read_text())
    skip = config["quantization_config"]["linear_weights_not_to_quantize"]
    config["quantization_config"]["linear_weights_not_to_quantize"] = [n for n in skip if n.endswith(".weight")]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def make_module_skip_variant(fmt: str) -> None:
    """The same checkpoint with its skip list in module form ("lm_head"), which transformers loads correctly.

    With the hub's "lm_head.weight" form transformers quantizes lm_head and never reads its weight (NaN logits), so
    its load skips converting the largest tensor; this variant times it doing the same work as aqlm_ctx.
    """
    source = CHECKPOINTS / f"tinyllama-{fmt}"
    directory = CHECKPOINTS / f"tinyllama-{fmt}-module-skip"
    directory.mkdir(exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    quantization = config["quantization_config"]
    quantization["linear_weights_not_to_quantize"] = [
        name.removesuffix(".weight") for name in quantization["linear_weights_not_to_quantize"]
    ]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for file in source.glob("*.safetensors*"):
        if not (directory / file.name).exists():
            (directory / file.name).symlink_to(file.resolve())


def worker(step: str, library: str, fmt: str) -> dict[str, float]:
    os.environ.setdefault("AQ_USE_JIT", "0")
    import torch

    directory = CHECKPOINTS / f"tinyllama-{fmt}"
    if step == "read_bytes":
        start = time.perf_counter()
        total = sum(len(file.read_bytes()) for file in sorted(directory.glob("*.safetensors")))
        return {"seconds": time.perf_counter() - start, "bytes": total}
    import transformers

    # Both libraries import the same transformers modeling module lazily (seconds on this machine): import it
    # before the clock, so the numbers compare loading rather than import time.
    _ = transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM, transformers.AutoConfig
    if library == "aqlm_ctx":
        import aqlm_ctx

        start = time.perf_counter()
        model = aqlm_ctx.from_pretrained(directory, dtype=torch.float32)
    else:
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    load_seconds = time.perf_counter() - start
    result = {"load_seconds": load_seconds}
    if step == "load_and_forward":
        ids = torch.arange(1, 9).unsqueeze(0)
        with torch.no_grad():
            model(ids)
            result["first_forward_seconds"] = time.perf_counter() - start - load_seconds
            forward_start = time.perf_counter()
            model(ids)
            result["second_forward_seconds"] = time.perf_counter() - forward_start
        result["seconds"] = load_seconds + result["first_forward_seconds"]
    else:
        result["seconds"] = load_seconds
    return result


def run(step: str, library: str, fmt: str) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--worker", step, library, fmt], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    results: dict[str, dict[str, dict[str, float]]] = {}
    steps = {  # key -> (step, library, checkpoint suffix)
        "read_bytes": ("read_bytes", "-", ""),
        "load/aqlm_ctx": ("load", "aqlm_ctx", ""),
        "load/transformers": ("load", "transformers", ""),
        "load/transformers_module_skip": ("load", "transformers", "-module-skip"),
        "load_and_forward/aqlm_ctx": ("load_and_forward", "aqlm_ctx", ""),
        "load_and_forward/transformers": ("load_and_forward", "transformers", ""),
    }
    for fmt in args.formats:
        make_checkpoint(fmt)
        make_module_skip_variant(fmt)
        runs: dict[str, list[dict[str, float]]] = {key: [] for key in steps}
        for _ in range(args.repeats):  # round-robin, so that drift of the machine hits every step alike
            for key, (step, library, suffix) in steps.items():
                runs[key].append(run(step, library, fmt + suffix))
                print(fmt, key, runs[key][-1], flush=True)
        results[fmt] = {
            key: {name: statistics.median(r[name] for r in done) for name in done[0]} for key, done in runs.items()
        }
        r = {key: value["seconds"] for key, value in results[fmt].items()}
        results[fmt]["ratios"] = {
            "transformers_load_over_ours": r["load/transformers"] / r["load/aqlm_ctx"],
            "transformers_module_skip_load_over_ours": r["load/transformers_module_skip"] / r["load/aqlm_ctx"],
            "ours_load_over_read_bytes": r["load/aqlm_ctx"] / r["read_bytes"],
            "transformers_load_and_forward_over_ours": r["load_and_forward/transformers"]
            / r["load_and_forward/aqlm_ctx"],
        }
        print(fmt, results[fmt]["ratios"], flush=True)
    import numba
    import torch

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "numba": numba.__version__,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": results}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

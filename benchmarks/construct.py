"""Skeleton construction time and memory: bare meta vs init_empty_weights + transformers' replace vs aqlm_quantized.

Each measurement runs in a fresh process (imports done before the clock starts); results go to
``benchmarks/results/construct.json`` and are summarised in BENCHMARKS.md.

    python benchmarks/construct.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
}
METHODS = ("a_bare_meta", "b_init_empty_weights_plus_transformers_replace", "c_aqlm_quantized")
RESULTS = Path(__file__).parent / "results" / "construct.json"


def worker(method: str, size: str) -> dict[str, float]:
    os.environ.setdefault("AQ_USE_JIT", "0")
    import torch
    import transformers.quantizers  # noqa: F401
    from accelerate import init_empty_weights
    from transformers import AqlmConfig as HfAqlmConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.aqlm import replace_with_aqlm_linear

    from aqlm_ctx import AqlmConfig, aqlm_quantized

    config = LlamaConfig(vocab_size=32000, **SIZES[size])
    config._attn_implementation = "eager"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "a_bare_meta":
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    elif method == "b_init_empty_weights_plus_transformers_replace":
        with init_empty_weights():
            model = LlamaForCausalLM(config)
        replace_with_aqlm_linear(model, modules_to_not_convert=["lm_head"], quantization_config=HfAqlmConfig())
    else:
        with aqlm_quantized(AqlmConfig(), skip=["lm_head"]):
            model = LlamaForCausalLM(config)
    seconds = time.perf_counter() - start
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert sum(1 for m in model.modules() if type(m).__name__ == "QuantizedLinear") in (0, 7 * config.num_hidden_layers)
    return {"seconds": seconds, "rss_growth_mb": rss_growth_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    results: dict[str, dict[str, dict[str, float]]] = {}
    for size in SIZES:
        results[size] = {}
        for method in METHODS:
            runs = []
            for _ in range(args.repeats):
                output = subprocess.run(
                    [sys.executable, __file__, "--worker", method, size], check=True, capture_output=True, text=True
                ).stdout
                runs.append(json.loads(output.strip().splitlines()[-1]))
            seconds = [run["seconds"] for run in runs]
            results[size][method] = {
                "min_ms": 1000 * min(seconds),
                "median_ms": 1000 * statistics.median(seconds),
                "max_rss_growth_mb": max(run["rss_growth_mb"] for run in runs),
            }
            print(size, method, results[size][method], flush=True)
        a, b, c = (results[size][m]["median_ms"] for m in METHODS)
        results[size]["ratios"] = {"c_over_a": c / a, "c_over_b": c / b}
        print(size, results[size]["ratios"], flush=True)
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": results}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

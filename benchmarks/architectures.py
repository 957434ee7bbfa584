"""Architecture sweep: every ``*ForCausalLM`` transformers exports, built tiny, through all three aqlm_ctx paths.

For each class the default config is shrunk (2 layers, hidden 64, 4 heads of 16, intermediate 128, vocab 128, few
experts, sub-configs likewise) and the model is built on meta

* under ``aqlm_quantized`` (the context), with ``@quantize_model`` (the decorator) and with
  ``replace_linear_layers`` on a ``torch.device("meta")`` build (the visitor): the three must give the same
  :func:`signature` (module paths and classes, parameters, buffers, ties);
* with transformers' own ``replace_with_aqlm_linear``: the sets of quantized module paths are compared and every
  difference gets a reason found by looking at the layer (MHA ``out_proj``, ``nn.Linear`` subclass, ...).

Layers whose sizes are not divisible by the group size are found on the plain build and skipped by path for every
path (ours would raise a clear error, transformers' ``QuantizedLinear`` an assertion). ``lm_head`` is skipped too.
With ``--forward`` the context-built model is materialised with random codes and run on a few token ids.

Results go to ``benchmarks/results/architectures.json`` (and a Markdown matrix next to it)::

    AQ_USE_JIT=0 python benchmarks/architectures.py [--forward] [--only Llama,GPT2] [--timeout 60]

The functions here are reused by ``tests/test_architectures.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("AQ_USE_JIT", "0")

import torch
import transformers
from aqlm import QuantizedLinear
from torch import nn

import aqlm_ctx
from aqlm_ctx import AqlmConfig, aqlm_quantized, quantize_model, replace_linear_layers
from aqlm_ctx.testing import model_signature, random_tensors

RESULTS = Path(__file__).parent / "results" / "architectures.json"
MATRIX = RESULTS.with_suffix(".md")
CONFIG = AqlmConfig(num_codebooks=2, nbits_per_codebook=8)  # 2x8 g8: the cheapest CPU forward (numba LUT)
TOKENS = (3, 4, 5, 6, 7)

HIDDEN, HEADS, HEAD_DIM, KV_HEADS, INTERMEDIATE, LAYERS, VOCAB, EXPERTS = 64, 4, 16, 2, 128, 2, 128, 4
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "word_embed_proj_dim", "model_dim"), HIDDEN),
    **dict.fromkeys(("hidden_dim", "projection_dim", "text_hidden_size", "embedding_size"), HIDDEN),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "ffn_hidden_size"),
        INTERMEDIATE,
    ),
    **dict.fromkeys(("d_ff", "mlp_dim", "inner_hidden_size", "dense_intermediate_size"), INTERMEDIATE),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "expert_intermediate_size",
            "ffn_hidden_size_moe",
        ),
        HIDDEN,
    ),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers"), LAYERS
    ),
    **dict.fromkeys(("num_decoder_layers", "num_encoder_layers", "depth"), LAYERS),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads"),
        HEADS,
    ),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), KV_HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "d_head", "attention_head_size"), HEAD_DIM),
    **dict.fromkeys(("vocab_size", "text_vocab_size"), VOCAB),
    **dict.fromkeys(
        ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"), EXPERTS
    ),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k"), 2),
    **dict.fromkeys(("first_k_dense_replace", "num_dense_layers"), 1),
    # multi-head latent attention (DeepSeek-style)
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 32),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim"), 8),
    "v_head_dim": HEAD_DIM,
    # state-space layers: expand * hidden == heads * head_dim == 128
    **dict.fromkeys(("state_size", "ssm_state_size", "mamba_d_state"), 16),
    **dict.fromkeys(("mamba_num_heads", "mamba_n_heads", "linear_num_value_heads"), 8),
    **dict.fromkeys(("mamba_head_dim", "mamba_d_head", "linear_value_head_dim", "linear_key_head_dim"), 16),
    "linear_num_key_heads": 4,
    "time_step_rank": 8,
    "n_groups": 1,
}
LAYER_LIST_MARKERS = ("layer", "pattern", "block", "types")


@dataclass
class Outcome:
    """What happened to one architecture."""

    name: str
    status: str = "not run"  # "ok", "differs", "build failed", "skipped", "ours failed", "timeout"
    error: str | None = None
    seconds: float = 0.0
    config_overrides: dict[str, Any] = field(default_factory=dict)
    linear: int = 0  # exact nn.Linear in the plain build
    linear_subclasses: dict[str, int] = field(default_factory=dict)
    conv1d: int = 0
    fused_expert_parameters: int = 0
    not_divisible: list[str] = field(default_factory=list)
    quantized: int = 0  # QuantizedLinear built by the context
    dense_linear: int = 0  # nn.Linear left by the context (skipped)
    context_decorator_visitor: bool | None = None
    mismatch: str | None = None
    transformers_quantized: int | None = None
    transformers_error: str | None = None
    same_paths_as_transformers: bool | None = None
    differences: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths
    forward: str | None = None  # "finite", "non-finite", or an error
    forward_reason: str | None = None  # why a forward failed, when it did
    default_config_builds: bool | str | None = None  # checked only when the tiny build fails
    traceback: str | None = None


def causal_lm_names() -> list[str]:
    """Every ``*ForCausalLM`` model class the installed transformers exports (``AutoModelForCausalLM`` excluded)."""
    return [name for name in dir(transformers) if name.endswith("ForCausalLM") and not name.startswith("Auto")]


# ---------------------------------------------------------------------------------------------------------------
# Tiny configs


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _init_keywords(config_class: type) -> set[str] | None:
    """Named parameters of the config's ``__init__`` (``None``: it takes anything through ``**kwargs`` only)."""
    params = inspect.signature(config_class.__init__).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return names or None


# Fixes for configs the generic shrinking cannot get right (validators, fields that default to None), by class.
EXTRA: dict[str, dict[str, Any]] = {
    "DbrxConfig": {"attn_config": {"rope_theta": 10000.0}},  # the default config lacks it (does not build)
    "Dots1Config": {"n_routed_experts": EXPERTS, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "Dots3NoteTextConfig": {"num_key_value_heads": HEADS},
    "DoryConfig": {  # to_dict() doubles these (attention + mlp blocks); __init__ halves them: 3 decoder layers
        "num_hidden_layers": 6,
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
        "n_input_layers": 2,
        "n_recurrent_layers": 2,
        "n_output_layers": 2,
    },
    "FalconH1Config": {"mamba_d_ssm": 2 * HIDDEN, "mamba_n_heads": 8, "mamba_d_head": 16},
    "GPTNeoConfig": {"attention_types": [[["global", "local"], 1]]},
    "Gemma3nTextConfig": {"num_kv_shared_layers": 0, "hidden_size_per_layer_input": 16, "laurel_rank": 16},
    # the default config fails its own validator
    "Gemma4AssistantConfig": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "Lfm2MoeConfig": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "Mamba2Config": {"num_heads": 8},
    "ZayaConfig": {"num_experts_per_tok": 1},
    "ZambaConfig": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},  # tied
    "Qwen4ExpTextConfig": {  # indexed-attention layers need every QSA field (the default config does not build)
        "indexer_n_heads": HEADS,
        "indexer_kv_heads": 1,
        "indexer_head_dim": HEAD_DIM,
        "indexer_budget": 64,
        "indexer_compress_ratio": 4,
    },
}
NONE_DEFAULTS = {"head_dim": HEAD_DIM, "num_key_value_heads": KV_HEADS}  # None means "derive": make it explicit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _representative_layers(values: dict[str, Any], old_layers: int) -> list[int]:
    """Layer indices to keep: the first layer of every distinct layer type, then the earliest others, >= LAYERS."""
    types = next(
        (v for k, v in values.items() if "type" in k and isinstance(v, list) and len(v) == old_layers),
        None,
    )
    keep: list[int] = []
    if types is not None:
        for index, kind in enumerate(types):
            if repr(kind) not in {repr(types[i]) for i in keep}:
                keep.append(index)
    for index in range(old_layers):
        if len(keep) >= LAYERS:
            break
        if index not in keep:
            keep.append(index)
    return sorted(keep)


def _merge(values: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _shrink(values: dict[str, Any], config_class: type | None) -> dict[str, Any]:
    """Shrink the size fields of one config's ``to_dict()``; recurse into sub-config dicts."""
    sub_configs = _sub_config_classes(config_class)
    layer_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in values), None)
    old_layers = values.get(layer_key) if layer_key else None
    keep = _representative_layers(values, old_layers) if _is_int(old_layers) and old_layers > LAYERS else None
    out = dict(values)
    for key, value in values.items():
        if key in SIZES and _is_int(value):
            out[key] = SIZES[key]
        elif key in NONE_DEFAULTS and value is None:
            out[key] = NONE_DEFAULTS[key]
        elif isinstance(value, dict) and (key in sub_configs or "model_type" in value):
            out[key] = _shrink(value, sub_configs.get(key))
        elif keep is not None and isinstance(value, (list, str)) and len(value) == old_layers:
            if isinstance(value, list) or any(marker in key for marker in LAYER_LIST_MARKERS):
                picked = [value[i] for i in keep]
                if key in SIZES and all(_is_int(v) for v in picked):
                    picked = [SIZES[key]] * len(picked)  # per-layer sizes
                out[key] = "".join(picked) if isinstance(value, str) else picked
        elif keep is not None and isinstance(value, list) and "layer" in key and all(_is_int(v) for v in value):
            out[key] = [keep.index(v) for v in value if v in keep]  # layer indices
        elif keep is not None and isinstance(value, dict) and "layer" in key:
            out[key] = {str(keep.index(int(k))): v for k, v in value.items() if str(k).isdigit() and int(k) in keep}
    if keep is not None and layer_key is not None:
        out[layer_key] = max(LAYERS, len(keep))
        for key, value in values.items():  # other counts of "all the layers" (e.g. KV-shared layers)
            if key != layer_key and "layers" in key and _is_int(value) and value == old_layers:
                out[key] = out[layer_key]
    vocab = out.get("vocab_size")
    if _is_int(vocab):
        taken = 0
        for key, value in values.items():
            if key.endswith(("token_id", "token_index")) and _is_int(value) and value >= vocab:
                out[key] = vocab - 1 - taken
                taken += 1
            elif key.endswith("token_id") and isinstance(value, list):
                out[key] = [v if v < vocab else vocab - 1 for v in value]
        if out.get("vocab_size_per_layer_input"):
            out["vocab_size_per_layer_input"] = vocab
    if _is_int(out.get("max_position_embeddings")) and out["max_position_embeddings"] > 4096:
        out["max_position_embeddings"] = 4096
    extra = EXTRA.get(getattr(config_class, "__name__", ""), {})
    return _merge(out, extra)


def _sub_config_classes(config_class: type | None) -> dict[str, type]:
    subs = getattr(config_class, "sub_configs", None) or {}
    return {key: value for key, value in subs.items() if isinstance(value, type)}


def tiny_config(model_class: type) -> tuple[Any, dict[str, Any]]:
    """A tiny instance of ``model_class.config_class``; returns it and the changed top-level fields."""
    config_class = model_class.config_class
    extra = EXTRA.get(config_class.__name__, {})
    try:
        default = config_class()
    except Exception:  # some default configs fail their own validators: start from the fixes
        default = config_class(**extra)
    values = default.to_dict()
    shrunk = _shrink(values, config_class)
    accepted = _init_keywords(config_class)
    changed = {key: value for key, value in shrunk.items() if value != values.get(key)}
    kwargs = {key: value for key, value in shrunk.items() if accepted is None or key in accepted}
    kwargs.pop("transformers_version", None)
    config = config_class(**kwargs)
    for key, value in changed.items():  # fields __init__ does not take (derived or **kwargs-only)
        if accepted is not None and key not in accepted and not isinstance(value, dict):
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(config, key, value)
    return config, {key: value for key, value in changed.items() if not isinstance(value, dict)}


# ---------------------------------------------------------------------------------------------------------------
# Building and comparing


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (a no-op elsewhere or without SIGALRM)."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


signature = model_signature


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first entry in which two signatures differ, in words; ``None`` if they are equal."""
    for key in a:
        if a[key] == b[key]:
            continue
        for x, y in zip(a[key], b[key], strict=False):
            if x != y:
                return f"{key}: {x} vs {y}"
        return f"{key}: {len(a[key])} vs {len(b[key])} entries"
    return None


def quantized_paths(model: nn.Module) -> set[str]:
    return {path for path, module in model.named_modules() if isinstance(module, QuantizedLinear)}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings (unused skip patterns, transformers' deprecations) and no transformers logging."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def transformers_replace(model: nn.Module, skip: list[str], config: AqlmConfig) -> None:
    """transformers' own ``replace_with_aqlm_linear`` with module-name skips."""
    import transformers.quantizers
    from transformers.integrations.aqlm import replace_with_aqlm_linear

    theirs = transformers.AqlmConfig(
        in_group_size=config.in_group_size,
        out_group_size=config.out_group_size,
        num_codebooks=config.num_codebooks,
        nbits_per_codebook=config.nbits_per_codebook,
    )
    replace_with_aqlm_linear(model, modules_to_not_convert=skip, quantization_config=theirs)


def _is_fused_expert(name: str, parameter: torch.Tensor) -> bool:
    return parameter.dim() == 3 and "expert" in name


def inspect_plain(model: nn.Module, config: AqlmConfig, outcome: Outcome) -> list[str]:
    """Count layer kinds of a plain meta build; return the paths of exact Linear layers not divisible into groups."""
    subclasses: dict[str, int] = {}
    not_divisible = []
    for path, module in model.named_modules():
        if type(module) is nn.Linear:
            outcome.linear += 1
            if module.in_features % config.in_group_size or module.out_features % config.out_group_size:
                not_divisible.append(path)
        elif isinstance(module, nn.Linear):
            subclasses[type(module).__name__] = subclasses.get(type(module).__name__, 0) + 1
        elif type(module).__name__ == "Conv1D":
            outcome.conv1d += 1
    outcome.linear_subclasses = subclasses
    outcome.fused_expert_parameters = sum(_is_fused_expert(n, p) for n, p in model.named_parameters())
    outcome.not_divisible = not_divisible
    return not_divisible


def explain_differences(plain: nn.Module, ours: set[str], theirs: set[str], skip: list[str]) -> dict[str, list[str]]:
    """Why each path quantized by only one side is so, decided from the layer in the plain build."""
    modules = dict(plain.named_modules())
    reasons: dict[str, list[str]] = {}
    for path in sorted(ours ^ theirs):
        module = modules.get(path)
        side = "only transformers quantizes" if path in theirs else "only aqlm_ctx quantizes"
        if module is None and path in ours and ".experts." in path:
            reason = "per-expert QuantizedLinear from aqlm_ctx's substitution of fused experts (not in the plain build)"
        elif module is None:
            reason = "unexplained: path absent from the plain build"
        elif isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            reason = "nn.MultiheadAttention out_proj (MHA reads .weight directly: transformers' forward breaks)"
        elif isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            own_forward = "forward" in vars(type(module))
            reason = (
                f"nn.Linear subclass {type(module).__name__}"
                + (" with its own forward (replacing it drops that forward)" if own_forward else "")
                + "; aqlm_ctx converts exact nn.Linear only"
            )
        elif path in ours and any(path.endswith(p) and not (path == p or path.endswith("." + p)) for p in skip):
            hit = next(p for p in skip if path.endswith(p))
            reason = f"transformers' skip {hit!r} matches {path!r} (a suffix test without a dot boundary)"
        else:
            reason = f"unexplained ({type(module).__name__})"
        reasons.setdefault(f"{side}: {reason}", []).append(path)
    return reasons


def run_forward(model: nn.Module) -> str:
    """Materialise ``model`` with random codes and run a few token ids; ``"finite"``, ``"non-finite"`` or an error."""
    aqlm_ctx.load_tensors(model, random_tensors(model), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        output = model(input_ids=ids)
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, tuple) else output
    return "finite" if torch.isfinite(logits).all() else "non-finite"


def sweep_one(name: str, config: AqlmConfig = CONFIG, forward: bool = False, timeout: float = 60.0) -> Outcome:
    """Build ``transformers.<name>`` tiny through every path and compare; never raises."""
    outcome = Outcome(name)
    start = time.perf_counter()
    try:
        with time_limit(timeout), quiet():
            _sweep(name, config, forward, outcome)
    except TimeoutError as error:
        if outcome.context_decorator_visitor is None:  # a timeout after the builds only cuts the forward short
            outcome.status = "timeout"
        outcome.error = _first_line(error)
    except Exception as error:
        if outcome.status == "not run":
            outcome.status = "build failed"
        outcome.error = outcome.error or _first_line(error)
        outcome.traceback = traceback.format_exc(limit=-3)
    outcome.seconds = round(time.perf_counter() - start, 3)
    return outcome


def default_config_builds(model_class: type) -> bool | str:
    """Whether transformers builds the class on meta from its unchanged default config (``False`` + why if not)."""
    try:
        with torch.device("meta"):
            model_class(model_class.config_class())
    except Exception as error:
        return _first_line(error)
    return True


def _sweep(name: str, config: AqlmConfig, forward: bool, outcome: Outcome) -> None:
    model_class = getattr(transformers, name)
    model_config, outcome.config_overrides = tiny_config(model_class)

    def build() -> nn.Module:
        return model_class(model_config)

    try:
        with torch.device("meta"):
            plain = build()
    except Exception as error:
        outcome.error = _first_line(error)
        outcome.default_config_builds = default_config_builds(model_class)
        raise
    skip = ["lm_head", *inspect_plain(plain, config, outcome)]
    outcome.status = "ours failed"  # from here on, a failure is ours
    with aqlm_quantized(config, skip=skip):
        by_context = build()
    by_decorator = quantize_model(config, skip=skip)(build)()
    with torch.device("meta"):
        by_visitor = build()
    replace_linear_layers(by_visitor, config, skip=skip)
    reference = signature(by_context)
    outcome.mismatch = first_difference(signature(by_decorator), reference) or first_difference(
        signature(by_visitor), reference
    )
    outcome.context_decorator_visitor = outcome.mismatch is None
    ours = quantized_paths(by_context)
    outcome.quantized = len(ours)
    outcome.dense_linear = sum(type(m) is nn.Linear for m in by_context.modules())
    outcome.status = "ok" if outcome.context_decorator_visitor else "ours failed"
    try:
        with torch.device("meta"):
            theirs_model = build()
        transformers_replace(theirs_model, skip, config)
        theirs = quantized_paths(theirs_model)
        outcome.transformers_quantized = len(theirs)
        outcome.same_paths_as_transformers = ours == theirs
        outcome.differences = explain_differences(plain, ours, theirs, skip)
    except Exception as error:
        outcome.transformers_error = _first_line(error)
    if outcome.status == "ok" and not outcome.same_paths_as_transformers and outcome.transformers_error is None:
        outcome.status = "differs"
    if forward:
        try:
            outcome.forward = run_forward(by_context)
        except Exception as error:
            outcome.forward = _first_line(error)
            outcome.forward_reason = explain_forward_failure(outcome.forward, traceback.format_exc(), build)


def dense_forward(build: Any) -> str:
    """The same tiny model with ordinary dense weights on CPU: ``"finite"``, ``"non-finite"`` or an error."""
    model = build().eval()
    with torch.no_grad():
        output = model(input_ids=torch.tensor([TOKENS]))
    logits = getattr(output, "logits", None)
    logits = logits if logits is not None else output[0]
    return "finite" if torch.isfinite(logits).all() else "non-finite"


def explain_forward_failure(error: str, trace: str, build: Any) -> str:
    """Whose a failed quantized forward is: the tiny config's (the dense model fails too), the model's, or ours."""
    try:
        dense = dense_forward(build)
    except Exception as dense_error:
        return f"not ours: the dense tiny model fails too ({_first_line(dense_error)})"
    if "_recompute_transformers_buffers" in trace and "_init_weights" in trace and "loading.py" not in error:
        return f"not ours: the model's own _init_weights fails when loading.py recomputes buffers with it ({error})"
    if "'QuantizedLinear' object has no attribute 'weight'" in error:
        return "model code reads .weight of a quantized layer in forward (AQLM layers have none; transformers too)"
    if "tie_weights_keys" in error:
        return "ours (loading.py): load_tensors calls model.tie_weights(), which cannot find a quantized decoder.weight"
    if "still on the meta device after loading" in error:
        return "ours (loading.py): a non-persistent buffer that transformers' _init_weights does not recompute"
    return f"unexplained (dense forward: {dense})"


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    built = [o for o in outcomes if o.context_decorator_visitor is not None]
    forwards = [o for o in outcomes if o.forward is not None]
    return {
        "classes": len(outcomes),
        "status_counts": counts,
        "built": len(built),
        "context_decorator_visitor_agree": sum(bool(o.context_decorator_visitor) for o in built),
        "same_paths_as_transformers": sum(bool(o.same_paths_as_transformers) for o in built),
        "transformers_failed": sum(o.transformers_error is not None for o in built),
        "with_conv1d": sum(o.conv1d > 0 for o in built),
        "with_fused_experts": sum(o.fused_expert_parameters > 0 for o in built),
        "with_not_divisible_layers": sum(bool(o.not_divisible) for o in built),
        "forward_finite": sum(o.forward == "finite" for o in forwards),
        "forward_run": len(forwards),
    }


def write_matrix(outcomes: list[Outcome], path: Path) -> None:
    rows = [
        "| architecture | status | Linear | QuantizedLinear (ours / transformers) | ctx≡dec≡vis | same as transformers "
        "| notes | forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        notes = []
        if o.conv1d:
            notes.append(f"{o.conv1d} Conv1D")
        if o.linear_subclasses:
            notes.append(", ".join(f"{n} {k}" for k, n in o.linear_subclasses.items()))
        if o.fused_expert_parameters:
            notes.append(f"{o.fused_expert_parameters} fused expert params")
        if o.not_divisible:
            notes.append(f"{len(o.not_divisible)} not divisible by group")
        if o.error:
            notes.append(o.error.replace("|", "\\|"))
        if o.transformers_error:
            notes.append("transformers: " + o.transformers_error.replace("|", "\\|"))
        theirs = "-" if o.transformers_quantized is None else str(o.transformers_quantized)
        agree = "-" if o.context_decorator_visitor is None else ("yes" if o.context_decorator_visitor else "NO")
        same = "-" if o.same_paths_as_transformers is None else ("yes" if o.same_paths_as_transformers else "no")
        rows.append(
            f"| {o.name} | {o.status} | {o.linear} | {o.quantized} / {theirs} | {agree} | {same} | "
            f"{'; '.join(notes)} | {(o.forward or '-').replace('|', '/')} |"
        )
    path.write_text("\n".join(rows) + "\n")


def merge(path: Path, names: list[str], forward: bool, timeout: float) -> None:
    """Re-run some architectures and replace their rows in an existing results file (summary and matrix too)."""
    report = json.loads(path.read_text())
    rows = {row["name"]: row for row in report["architectures"]}
    for name in names:
        rows[name] = asdict(sweep_one(name, forward=forward, timeout=timeout))
    outcomes = [Outcome(**row) for row in rows.values()]
    report["architectures"] = [asdict(o) for o in outcomes]
    report["summary"] = summary(outcomes)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_matrix(outcomes, path.with_suffix(".md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forward", action="store_true", help="also load random codes and run a forward")
    parser.add_argument("--only", default="", help="comma-separated class names or prefixes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per architecture")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true", help="replace only the --only rows of an existing --output")
    args = parser.parse_args(argv)
    names = causal_lm_names()
    if args.only:
        wanted = [part.strip() for part in args.only.split(",") if part.strip()]
        names = [n for n in names if any(n.startswith(w) for w in wanted)]
    if args.merge:
        merge(args.output, names, args.forward, args.timeout)
        return 0
    torch.manual_seed(0)
    outcomes = []
    start = time.perf_counter()
    for name in names:
        outcome = sweep_one(name, forward=args.forward, timeout=args.timeout)
        outcomes.append(outcome)
        extra = f" forward={outcome.forward}" if outcome.forward else ""
        print(f"{outcome.seconds:7.2f}s {name:40s} {outcome.status:13s} {outcome.error or ''}{extra}", flush=True)
    report = {
        "config": CONFIG.format_name,
        "sizes": {"hidden": HIDDEN, "heads": HEADS, "head_dim": HEAD_DIM, "intermediate": INTERMEDIATE},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpus": os.cpu_count(),
        },
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary(outcomes),
        "architectures": [asdict(o) for o in outcomes],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_matrix(outcomes, args.output.with_suffix(".md"))
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Registration of aqlm_ctx's GPU kernels as operators ``torch.ops.aqlm_ctx.<name>``.

The ops are defined with the dispatcher's library API (a schema, a CUDA implementation and a fake implementation)
rather than ``torch.library.custom_op``: both give ``torch.compile`` an opaque node with known output shapes and
let CUDA graphs capture the launch, but ``custom_op`` adds Python wrappers to every call — measured ~25 µs per call
on an H200 host, more than a decode kernel at 4096² takes on the GPU. Eager decoding calls these ops once per layer
and token, so that time is the model's.

The ops have no autograd formula: :mod:`.dispatch` calls them only where no input requires grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MATMUL_SCHEMA", "define"]

MATMUL_SCHEMA = "(Tensor input, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias) -> Tensor"
"""The schema of every ``input @ W.T + bias`` op (our CUDA decode, 1x16 and prefill kernels, and Triton)."""

_LIBRARY = torch.library.Library("aqlm_ctx", "FRAGMENT")


def define(
    name: str,
    schema: str,
    cuda: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """Define ``aqlm_ctx::<name><schema>`` with ``cuda`` as its CUDA implementation and ``fake`` for tracing.

    Args:
        name: op name in the ``aqlm_ctx`` namespace.
        schema: argument and return schema, e.g. ``"(Tensor x, Tensor? bias) -> Tensor"``.
        cuda: runs the op on CUDA tensors.
        fake: output tensor of the right shape, dtype and device, from the inputs' metadata only.

    Returns:
        The op, ``torch.ops.aqlm_ctx.<name>``.

    Example:
        >>> twice = define("twice", "(Tensor x) -> Tensor", lambda x: x * 2, torch.empty_like)  # doctest: +SKIP
    """
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"aqlm_ctx::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.aqlm_ctx, name)

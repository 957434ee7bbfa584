"""CPU kernels for AQLM layers (placeholder until the race-free lookup-table kernel lands)."""

from __future__ import annotations

import torch

from .reference import reference_matmul

__all__ = ["matmul", "supports"]


def supports(input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """Whether :func:`matmul` handles this layer on CPU."""
    return False


def matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """CPU AQLM matmul."""
    return reference_matmul(input, codes, codebooks, scales, bias)

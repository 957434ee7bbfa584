"""CUDA kernels for AQLM layers written in Triton (placeholder until they land)."""

from __future__ import annotations

import torch

__all__ = ["matmul", "supports"]


def supports(input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """Whether :func:`matmul` handles this layer."""
    return False


def matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """CUDA AQLM matmul."""
    raise NotImplementedError("no Triton kernel covers this layer")

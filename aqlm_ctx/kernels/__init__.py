"""Kernels behind aqlm.QuantizedLinear layers that aqlm_ctx builds or loads."""

from .dispatch import AqlmMatmul, aqlm_matmul, gpu_kernels_enabled, install_kernels
from .reference import dequantize_weight, reference_matmul

__all__ = [
    "AqlmMatmul",
    "aqlm_matmul",
    "dequantize_weight",
    "gpu_kernels_enabled",
    "install_kernels",
    "reference_matmul",
]

"""Kernel selection for aqlm.QuantizedLinear layers built or loaded by aqlm_ctx.

aqlm's own ``QuantizedLinear.forward`` picks a kernel on its first call and caches it on the layer; on CPU that
choice races (numba, more than one thread), permutes the codes in place, and sticks when the layer later moves to
another device. aqlm_ctx instead installs :class:`AqlmMatmul` as the layer's ``gemv_op`` and ``gemm_op``: it chooses
on every call from the tensors' device, dtype and format, and never changes the codes.

Switch: ``AQLM_CTX_GPU_KERNELS=0`` in the environment makes CUDA layers use aqlm's stock kernels instead of ours.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad

from .reference import dequantize_weight, reference_matmul

__all__ = ["AqlmMatmul", "aqlm_matmul", "gpu_kernels_enabled", "install_kernels"]


def gpu_kernels_enabled() -> bool:
    """Whether aqlm_ctx's own CUDA kernels are used (``AQLM_CTX_GPU_KERNELS`` is not ``0``/``false``/``off``)."""
    return os.environ.get("AQLM_CTX_GPU_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def _meta_matmul(input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    out_features = codes.shape[0] * codebooks.shape[2]
    return torch.empty(*input.shape[:-1], out_features, dtype=input.dtype, device="meta")


def _stock_cuda_matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """aqlm's own kernel for the call, or the plain-torch matmul where aqlm's kernels would fail or misread: they
    compute in fp16 / bf16 and read codebooks, scales and bias as the input's dtype (fp32 raises, mixed dtypes give
    garbage)."""
    from aqlm.inference_kernels import get_forward_pass_kernel

    layer = (codebooks, scales) if bias is None else (codebooks, scales, bias)
    if input.dtype not in (torch.float16, torch.bfloat16) or any(t.dtype != input.dtype for t in layer):
        return reference_matmul(input, codes, codebooks, scales, bias)
    many_tokens = math.prod(input.shape[:-1]) > 6
    if not input.is_contiguous() or input.data_ptr() % 16:  # stock's matvec reads rows as 16-byte vectors
        input = input.clone(memory_format=torch.contiguous_format)
    kernel = get_forward_pass_kernel(codebooks, many_tokens)
    return kernel(input, codes, codebooks, scales, bias)


def _triton_or_stock_matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    triton: bool = True,
) -> torch.Tensor:
    """Our Triton kernel where it covers the call (and ``triton`` is true), else aqlm's stock CUDA kernel (the
    plain-torch matmul for dtypes those do not take).

    Both launch on the *current* device, so the tensors' device is made current first (layers spread over several
    GPUs by a device_map are on other devices than the current one).
    """
    with torch.cuda.device(input.device):
        if triton:
            from . import triton_kernels

            if triton_kernels.supports(input, codes, codebooks):
                return triton_kernels.matmul(input, codes, codebooks, scales, bias)
        return _stock_cuda_matmul(input, codes, codebooks, scales, bias)


def _forward_kernel(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The fastest correct kernel for these tensors' device, dtype and format (no autograd)."""
    if codes.shape[1] == 0:  # no input features: the output is the bias; no kernel takes an empty reduction
        return reference_matmul(input, codes, codebooks, scales, bias)
    if input.is_cuda:
        enabled = gpu_kernels_enabled()
        if enabled:
            # Our CUDA ops switch to their tensors' device themselves.
            from . import cuda_kernels

            if cuda_kernels.supports(input, codes, codebooks, scales, bias):
                return cuda_kernels.matmul(input, codes, codebooks, scales, bias)
            if cuda_kernels.supports_1x16(input, codes, codebooks, scales, bias):
                return cuda_kernels.matmul_1x16(input, codes, codebooks, scales, bias)
            if cuda_kernels.supports_prefill(input, codes, codebooks, scales, bias):
                return cuda_kernels.prefill_matmul(input, codes, codebooks, scales, bias)
            if cuda_kernels.supports_dequantized(input, codes, codebooks, scales, bias):
                return cuda_kernels.dequantized_matmul(input, codes, codebooks, scales, bias)
        return _triton_or_stock_matmul(input, codes, codebooks, scales, bias, triton=enabled)
    if input.device.type == "cpu" and not torch.compiler.is_exporting():  # export takes no graph break: plain torch
        from . import cpu

        if cpu.supports(input, codes, codebooks):
            return cpu.matmul(input, codes, codebooks, scales, bias)
    return reference_matmul(input, codes, codebooks, scales, bias)


class _MatmulWithInputGrad(torch.autograd.Function):
    """Fast kernel forward; backward to the input (and bias) through the dequantized weight."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(codes, codebooks, scales)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            output = _forward_kernel(input, codes, codebooks, scales, bias)
        # A view of a kernel's buffer cannot be modified in place by autograd rules (peft's LoRA adds into it).
        return output.clone() if output._base is not None else output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes, codebooks, scales = ctx.saved_tensors
        grad_input = grad_output @ dequantize_weight(codes, codebooks, scales).to(grad_output.dtype)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_input, None, None, None, grad_bias


def aqlm_matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``input @ W.T + bias`` for the AQLM weight ``W`` that ``codes``, ``codebooks`` and ``scales`` encode.

    Codes are always in the checkpoint layout ``[out_groups, in_groups, num_codebooks]`` and are never modified.
    Gradients: to the input and bias through the fast forward kernel and a dequantized backward; to codebooks or
    scales (when they require grad), forward-mode tangents and ``torch.func`` transforms through the plain-torch
    path, so every derivative is exact. ``torch.jit.trace`` and, on CPU, ``torch.export`` record the plain-torch
    path too.
    """
    if codes.is_meta and not input.is_meta:
        raise RuntimeError(
            f"an AQLM layer ({codes.shape[0] * codebooks.shape[2]}x{codes.shape[1] * codebooks.shape[3]}) was called "
            f"with an input on {input.device} while its codes are on the meta device: the model has no weights yet; "
            "load a checkpoint into it first (aqlm_ctx.load_checkpoint or aqlm_ctx.from_pretrained)"
        )
    if input.is_meta:
        return _meta_matmul(input, codes, codebooks)
    if _transformed(input):
        return reference_matmul(input, codes, codebooks, scales, bias)
    if not torch.is_grad_enabled():
        return _forward_kernel(input, codes, codebooks, scales, bias)
    if codebooks.requires_grad or scales.requires_grad:
        return reference_matmul(input, codes, codebooks, scales, bias)
    if input.requires_grad or (bias is not None and bias.requires_grad):
        return _MatmulWithInputGrad.apply(input, codes, codebooks, scales, bias)
    return _forward_kernel(input, codes, codebooks, scales, bias)


def _transformed(input: torch.Tensor) -> bool:
    """Whether ``input`` carries a forward-mode tangent, is inside a ``torch.func`` transform (vmap, grad, jvp) or
    is traced by ``torch.jit.trace``: plain torch propagates and records those, the kernels (and their autograd
    function) do not (a trace would record only an empty output buffer)."""
    if torch.jit.is_tracing():
        return True
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(input):
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(input).tangent is not None


class AqlmMatmul:
    """Stands in for aqlm's cached autograd op: ``QuantizedLinear.forward`` calls ``AqlmMatmul.apply(...)``."""

    apply = staticmethod(aqlm_matmul)


def _any_size(input: torch.Tensor) -> bool:
    """aqlm's gemv/gemm rule; both ops are the same dispatcher, so the answer does not matter."""
    return True


def install_kernels(layer: nn.Module) -> None:
    """Make ``layer`` (an ``aqlm.QuantizedLinear``) run through :func:`aqlm_matmul` from its next forward on.

    This also undoes a kernel choice aqlm cached earlier (for instance by a forward on the meta device).
    """
    layer.__dict__.update(gemv_op=AqlmMatmul, gemm_op=AqlmMatmul, use_gemv_rule=_any_size)

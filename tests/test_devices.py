"""Models moved between CPU and GPU after a forward still compute correctly (needs CUDA; skipped without)."""

from __future__ import annotations

import pytest
import torch
from aqlm import QuantizedLinear

from aqlm_ctx import AqlmConfig, aqlm_quantized, load_tensors
from aqlm_ctx.testing import random_tensors

from .hub import dequantize

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("fmt", [(1, 16), (2, 8), (1, 8)])
def test_cpu_gpu_cpu_round_trip(fmt: tuple[int, int]) -> None:
    with aqlm_quantized(AqlmConfig(num_codebooks=fmt[0], nbits_per_codebook=fmt[1])):
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    load_tensors(model, random_tensors(model), dtype=torch.float16)
    layers = [m for m in model if isinstance(m, QuantizedLinear)]
    x = torch.randn(5, 256, dtype=torch.float16)

    def reference(inputs: torch.Tensor) -> torch.Tensor:
        h = inputs.double()
        for layer in layers:
            h = (
                h @ dequantize(layer.codes.cpu(), layer.codebooks.cpu(), layer.scales.cpu()).T
                + layer.bias.cpu().double()
            )
            if layer is layers[0]:
                h = h.relu()
        return h

    with torch.no_grad():
        on_cpu = model(x)
        codes_before = [layer.codes.clone() for layer in layers]
        model.cuda()
        on_gpu = model(x.cuda())
        model.cpu()
        again = model(x)
    expected = reference(x).float()
    torch.testing.assert_close(on_cpu.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(on_gpu.float().cpu(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(again.float(), expected, rtol=2e-2, atol=2e-2)
    assert all(torch.equal(layer.codes, before) for layer, before in zip(layers, codes_before, strict=True))

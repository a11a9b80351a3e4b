"""The CUDA platform's Triton dequant-GEMM against the weights dequantized by the torch fallback.

Every packed format (tests/gguf_models.py makes random blocks), segments of two formats as
a fused layer with mixed shards has, a bias, and batches that do and do not fill a tile.
On the CPU this runs in Triton's interpreter: float32 x (IEEE float32 products) and float16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_models import random_packed

pytest.importorskip("triton")

FORMATS = ["F32", "F16", "BF16", "I8", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def _weight(fmts, rows, cols, device):
    from piston.checkpoint.packed import FORMATS as SPECS
    from piston.models.layers.quant_formats import dequantize

    rng = np.random.default_rng(len(fmts[0]) + rows[0])
    parts = [random_packed(f, r, cols, rng) for f, r in zip(fmts, rows)]
    segments = [torch.from_numpy(np.ascontiguousarray(p.data)).to(device) for p in parts]
    dense = torch.cat([dequantize(s.cpu(), f, cols) for s, f in zip(segments, fmts)])
    return segments, [SPECS[f].code for f in fmts], dense


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 19])
def test_dequant_matmul_matches_dequantized_weight(device, fmt, rows):
    from piston_cuda.kernels.dequant_matmul import dequant_matmul

    other = "Q8_0" if fmt != "Q8_0" else "Q4_K"
    segments, codes, dense = _weight([fmt, other], [40, 24], 256, device)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(64)
    expected = F.linear(x.double(), dense.double(), bias.double())
    got = dequant_matmul(x.to(device), segments, codes, bias.to(device)).cpu()
    scale = float((x.abs().double() @ dense.abs().double().T).max())
    assert (got.double() - expected).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
def test_dequant_matmul_half_precision_x(device, fmt):
    from piston_cuda.kernels.dequant_matmul import qkernel
    from piston.models.layers.quantized import PackedWeight

    rng = np.random.default_rng(3)
    packed = PackedWeight(256, [(None, 32)])
    packed.add(None, random_packed(fmt, 32, 256, rng))
    packed.to(device)
    dense = packed.dequantize().cpu()
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0))
    got = qkernel(x.half().to(device), packed).cpu()
    assert got.shape == (2, 3, 32) and got.dtype == torch.float16
    expected = F.linear(x.double(), dense.double())
    scale = float((x.abs().double().reshape(-1, 256) @ dense.abs().double().T).max())
    assert (got.double() - expected).abs().max().item() <= 2e-3 * scale

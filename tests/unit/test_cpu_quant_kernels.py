"""Piston's C++ kernels for packed weights against the torch fallback, every format.

The fallback decodes exactly as gguf does (tests/unit/test_packed_weights.py), so these
compare the kernels with the reference weights; only float32 summation order differs.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_models import random_packed
from piston.checkpoint.packed import FORMATS
from piston.models.layers.quant_formats import dequantize
from piston.models.layers.quantized import PackedWeight
from piston_cpu import kernels, layer_kernels

pytestmark = pytest.mark.skipif(kernels.unavailable_reason() is not None,
                                reason=f"CPU kernels: {kernels.unavailable_reason()}")


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None, "the CPU kernels should build on this machine"
    return module


def _segments(fmts, rows, cols, seed):
    rng = np.random.default_rng(seed)
    parts = [random_packed(f, r, cols, rng) for f, r in zip(fmts, rows)]
    datas = [torch.from_numpy(np.ascontiguousarray(p.data)) for p in parts]
    weight = torch.cat([dequantize(d, f, cols) for d, f in zip(datas, fmts)])
    return datas, [FORMATS[f].code for f in fmts], weight


def _assert_close(got, x, weight, bias=None):
    """Float32 sums in another order: within 1e-6 of the sum of the products' magnitudes."""
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    scale = float((x.abs().double() @ weight.abs().double().T).max())
    torch.testing.assert_close(got.double(), expected, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize("fmt", list(FORMATS))
# The register path to 8 rows, the tile path to 191, then blocks decoded for the packed GEMM
# (600: three chunks of 256 rows of x).
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 40, 191, 192, 600])
def test_qlinear_matches_the_dequantized_weight(ops, fmt, rows):
    # Two segments, the second in another format (a fused layer whose shards differ): the
    # tile path's units of 8 weight rows end short in both, and the second packed block of
    # 32 (or 16) rows holds both segments' rows and zero padding.
    other = "Q8_0" if fmt != "Q8_0" else "Q4_K"
    datas, codes, weight = _segments([fmt, other], [45, 7], 512, rows)
    x, bias = torch.randn(rows, 512), torch.randn(52)
    _assert_close(ops.qlinear(x, datas, codes, bias), x, weight, bias)
    _assert_close(ops.qlinear(x, datas, codes), x, weight)
    wide = torch.randn(rows, 520)  # rows of a wider tensor (a strided view)
    _assert_close(ops.qlinear(wide[:, :512], datas, codes), wide[:, :512], weight)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("cols", [576, 96])
@pytest.mark.parametrize("rows", [1, 3])
def test_register_path_with_a_partial_group(ops, fmt, cols, rows):
    # The 8-wide path takes one row of x's scales eight chunks at once, and the AVX-512 path
    # runs 4 (one row of x) or 2 (3 rows) chunks at a time: 576 values (SmolLM2's rows) leave
    # two chunks after whole groups, 96 three and no whole group.
    datas, codes, weight = _segments([fmt], [9], cols, cols)
    x = torch.randn(rows, cols)
    _assert_close(ops.qlinear(x, datas, codes), x, weight)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0", "Q6_K", "BF16", "I8"])
def test_qembedding_and_qdequantize_are_exact(ops, fmt):
    datas, codes, weight = _segments([fmt], [30], 256, 7)
    ids = torch.tensor([0, 29, 3, 3, 17])
    torch.testing.assert_close(ops.qembedding(ids, datas[0], codes[0], 256), weight[ids], atol=0, rtol=0)
    torch.testing.assert_close(ops.qdequantize(datas, codes, 256), weight, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("cols", [512, 96])
def test_opt_in_int8_activations(ops, fmt, rows, cols):
    # quant_int8x.h (PISTON_CPU_QUANT_ACTIVATIONS=int8; with VNNI quant_int8x512.h, which
    # takes chunks in pairs: 96 values leave one alone): x rounded to int8 per 32 values, so
    # the products are off by at most half a step of x (max|x| / 254 per block) times |w|;
    # formats without the integer path (the K-quants) stay exact.
    if fmt == "Q4_K" and cols % 256:
        pytest.skip("Q4_K rows are whole 256-value blocks")
    datas, codes, weight = _segments([fmt], [24], cols, rows + 11)
    x = torch.randn(rows, cols)
    got = ops.qlinear(x, datas, codes, None, True)
    expected = F.linear(x.double(), weight.double())
    chunks = cols // 32
    step = x.abs().reshape(rows, chunks, 32).amax(-1, keepdim=True).expand(rows, chunks, 32).reshape(rows, cols) / 254
    bound = (step.double() @ weight.abs().double().T) * 1.001 + 1e-5
    assert ((got.double() - expected).abs() <= bound).all()
    if fmt == "Q4_K":
        _assert_close(got, x, weight)
    else:
        assert not torch.equal(got, ops.qlinear(x, datas, codes))  # it did round x


def test_kernels_reject_what_they_cannot_read(ops):
    datas, codes, _ = _segments(["Q4_0"], [4], 64, 0)
    with pytest.raises(RuntimeError, match="must be contiguous uint8"):
        ops.qlinear(torch.randn(1, 96), datas, codes)  # 96 columns need other row sizes
    with pytest.raises(RuntimeError, match="unknown packed format"):
        ops.qlinear(torch.randn(1, 64), datas, [99])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.qembedding(torch.tensor([4]), datas[0], codes[0], 64)


def test_layer_wrappers_cover_every_batch_and_fall_back(ops):
    rng = np.random.default_rng(8)
    weight = PackedWeight(256, [(0, 24), (1, 24)])
    weight.add(0, random_packed("Q4_K", 24, 256, rng))
    weight.add(1, random_packed("Q5_0", 24, 256, rng))
    assert layer_kernels.kernel_takes(weight)
    qlinear = layer_kernels.make_qlinear(ops)
    dense = weight.dequantize()
    for rows in (1, 64, 300, 4097):  # the kernel's three paths (its last in 256-row chunks)
        x = torch.randn(rows, 256)
        _assert_close(qlinear(x, weight), x, dense)
    x16 = torch.randn(2, 3, 256, dtype=torch.bfloat16)  # not a float32 matrix: converted around the kernel
    torch.testing.assert_close(qlinear(x16, weight), F.linear(x16.float(), dense).bfloat16())
    embed = PackedWeight(256, [(None, 24)])
    embed.add(None, random_packed("Q8_0", 24, 256, rng))
    ids = torch.tensor([[1, 2, 3], [23, 0, 5]])
    got = layer_kernels.make_qembedding(ops)(ids, embed)
    torch.testing.assert_close(got, embed.dequantize()[ids], atol=0, rtol=0)


def test_activations_stay_float32_unless_asked(monkeypatch):
    monkeypatch.delenv("PISTON_CPU_QUANT_ACTIVATIONS", raising=False)
    assert layer_kernels.int8_activations() is False
    monkeypatch.setenv("PISTON_CPU_QUANT_ACTIVATIONS", "int8")
    assert layer_kernels.int8_activations() is True
    monkeypatch.setenv("PISTON_CPU_QUANT_ACTIVATIONS", "fp8")
    with pytest.raises(ValueError, match="use int8"):
        layer_kernels.int8_activations()

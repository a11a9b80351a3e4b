"""Packed (quantized) weights in the core: formats, int8 quantization, and the torch fallback.

Every decoder is checked bit for bit against ``gguf.quants.dequantize``, the code
transformers loads GGUF files with, so the fallback and the reference see the same weights.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_models import quantize_k, random_packed
from piston.checkpoint.packed import FORMATS, PackedArray, as_packed, dequantize_rows, quantize_int8, \
    resolve_quantization
from piston.models.layers.quant_formats import dequantize
from piston.models.layers.quantized import PackedWeight

ALL_FORMATS = list(FORMATS)
BLOCK_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_torch_decoder_matches_gguf_bit_for_bit(fmt):
    packed = random_packed(fmt, 5, 512, np.random.default_rng(0))
    reference = dequantize_rows(fmt, packed.data, 512)
    assert np.isfinite(reference).all() and np.abs(reference).max() > 0
    got = dequantize(torch.from_numpy(packed.data), fmt, 512).numpy()
    np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_writer_round_trips(fmt):
    # The tests' own K-quant writer (gguf only dequantizes K-quants): its blocks decode
    # to the weights within the format's step.
    w = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    back = dequantize_rows(fmt, quantize_k(w, fmt), 512)
    bound = {"Q4_K": 0.25, "Q5_K": 0.12, "Q6_K": 0.08}[fmt]
    assert np.abs(back - w).max() < bound


def test_int8_is_symmetric_per_output_row():
    w = np.random.default_rng(2).standard_normal((6, 40)).astype(np.float32) * np.arange(1, 7)[:, None]
    w[3] = 0.0  # an all-zero row keeps scale 0
    packed = quantize_int8(w)
    assert packed.data.shape == (6, 44)
    scale = packed.data[:, :4].copy().view(np.float32)[:, 0]
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    q = packed.data[:, 4:].view(np.int8)
    assert np.abs(q).max() == 127 and (q[3] == 0).all()
    back = packed.dequantize()
    assert (np.abs(back - w) <= scale[:, None] / 2 + 1e-7).all()
    np.testing.assert_array_equal(dequantize(torch.from_numpy(packed.data), "I8", 40).numpy(), back)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q6_K", "F16", "I8"])
def test_narrow_keeps_blocks_packed_and_decodes_cuts(fmt):
    packed = random_packed(fmt, 6, 512, np.random.default_rng(3))
    full = packed.dequantize()
    rows = packed.narrow(0, 2, 3)
    assert isinstance(rows, PackedArray)
    np.testing.assert_array_equal(rows.dequantize(), full[2:5])
    cols = packed.narrow(1, 256, 256)
    assert isinstance(cols, PackedArray) == (fmt != "I8")  # an I8 row's scale covers the row
    np.testing.assert_array_equal(np.asarray(cols.dequantize() if isinstance(cols, PackedArray) else cols),
                                  full[:, 256:])
    cut = packed.narrow(1, 16, 100)  # through the blocks: decoded
    assert isinstance(cut, np.ndarray) or fmt in ("F16",)
    np.testing.assert_array_equal(np.asarray(cut.dequantize() if isinstance(cut, PackedArray) else cut),
                                  full[:, 16:116])


def test_packed_weight_segments_and_fallback():
    rng = np.random.default_rng(4)
    parts = {"q": random_packed("Q4_K", 8, 256, rng), "k": random_packed("Q4_K", 4, 256, rng),
             "v": random_packed("Q6_K", 4, 256, rng)}
    weight = PackedWeight(256, [("q", 8), ("k", 4), ("v", 4)])
    for shard in ("v", "q", "k"):  # in any order, as a checkpoint lists them
        weight.add(shard, parts[shard])
    assert weight.formats == ("Q4_K", "Q6_K") and weight.segment_rows == (12, 4)  # q and k share a segment
    full = np.concatenate([parts[s].dequantize() for s in ("q", "k", "v")])
    torch.testing.assert_close(weight.dequantize(), torch.from_numpy(full), atol=0, rtol=0)
    x, b = torch.randn(3, 256), torch.randn(16)
    torch.testing.assert_close(weight.linear(x, b), F.linear(x, torch.from_numpy(full), b))
    ids = torch.tensor([[0, 5], [7, 2]])
    single = PackedWeight(256, [(None, 8)])
    single.add(None, parts["q"])
    torch.testing.assert_close(single.embedding(ids), torch.from_numpy(parts["q"].dequantize())[ids], atol=0, rtol=0)


def test_packed_weight_float_shards_pad_and_int8():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    as_f32 = PackedWeight(64, [(None, 7)])  # an embedding's last rank: zero rows after its own
    as_f32.add(None, torch.from_numpy(w))
    assert as_f32.formats == ("F32",)
    expected = np.concatenate([w, np.zeros((2, 64), np.float32)])
    torch.testing.assert_close(as_f32.dequantize(), torch.from_numpy(expected), atol=0, rtol=0)
    as_int8 = PackedWeight(64, [(None, 5)], quantize="int8")
    as_int8.add(None, w)
    assert as_int8.formats == ("I8",)
    torch.testing.assert_close(as_int8.dequantize(), torch.from_numpy(quantize_int8(w).dequantize()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not match"):
        PackedWeight(64, [(None, 4)]).add(None, w)
    np.testing.assert_array_equal(as_packed(w).dequantize(), w)


def test_resolve_quantization():
    assert resolve_quantization(None, "m.gguf") == "gguf"
    assert resolve_quantization("auto", "folder") == "none"
    assert resolve_quantization("int8", "folder") == "int8"
    with pytest.raises(ValueError, match="not one"):
        resolve_quantization("gguf", "folder")
    with pytest.raises(ValueError, match="one of"):
        resolve_quantization("fp8", "folder")


def test_gguf_types_not_served_packed_are_dequantized_and_named(tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    import gguf
    from piston.checkpoint.gguf_tensors import iterate_gguf_tensors, packed_tensor_formats

    rng = np.random.default_rng(6)
    q3k = rng.integers(0, 256, (4, 110), dtype=np.uint8)  # Q3_K: 110 bytes per 256 values
    q3k[:, 108:110] = np.array([1e-3], np.float16).view(np.uint8)
    q4 = random_packed("Q4_0", 4, 256, rng)
    path = str(tmp_path / "mixed.gguf")
    writer = gguf.GGUFWriter(path, "qwen2")  # not llama: no q/k row permutation to undo
    writer.add_tensor("blk.0.attn_q.weight", q3k, raw_dtype=gguf.GGMLQuantizationType.Q3_K)
    writer.add_tensor("blk.0.ffn_up.weight", q4.data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = SimpleNamespace(num_attention_heads=2, num_key_value_heads=2)
    assert packed_tensor_formats(path) == {"model.layers.0.mlp.up_proj.weight": "Q4_0"}
    with caplog.at_level(logging.INFO, logger="piston.checkpoint.gguf_tensors"):
        tensors = dict(iterate_gguf_tensors(path, config, packed=True))
    up = tensors["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(up, PackedArray) and up.fmt == "Q4_0"
    np.testing.assert_array_equal(up.data, q4.data)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, np.ndarray) and q.dtype == np.float32
    np.testing.assert_array_equal(q, gguf.quants.dequantize(q3k, gguf.GGMLQuantizationType.Q3_K))
    lines = [r.getMessage() for r in caplog.records if "Dequantized" in r.getMessage()]
    assert len(lines) == 1 and "blk.0.attn_q.weight (Q3_K)" in lines[0] and "ffn_up" not in lines[0]

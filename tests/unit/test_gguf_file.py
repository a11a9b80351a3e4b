"""Piston's own GGUF header reader against gguf.GGUFReader: the same fields, values and tensors."""

import numpy as np
import pytest
from piston.step import gguf_metadata
from piston.step.gguf_file import GGUFFile


def _assert_same(path: str) -> None:
    import gguf

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # gguf adds the header as fields
    assert list(ours.fields) == keys
    for key in keys:
        a, b = ours.fields[key], theirs.fields[key]
        assert [int(t) for t in a.types] == [int(t) for t in b.types], key
        va, vb = a.contents(), b.contents()
        if isinstance(vb, float):
            assert va == pytest.approx(vb), key
        else:
            assert va == vb, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes, a.data_offset) == \
            (b.name, b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data), a.name


def test_every_value_type_and_tensor_type(tmp_path):
    import gguf
    from gguf.quants import quantize

    path = str(tmp_path / "all.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.strs", ["a", "", "ünïcode", "x" * 300])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.bools", [True, False, True])
    writer.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    writer.add_tensor("f32", w)
    writer.add_tensor("f16", w.astype(np.float16))
    writer.add_tensor("q4_0", quantize(w, gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("q8_0", quantize(w, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("i32", np.arange(10, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same(path)
    assert GGUFFile(path).fields["t.strs"].contents() == ["a", "", "ünïcode", "x" * 300]


def test_smollm2_file_reads_as_gguf_reads_it(smollm2_path):
    # 49,152 tokens, 48,900 merges, a chat template and 272 Q4_1/Q8_0/F32 tensors.
    _assert_same(smollm2_path)
    gguf_metadata._reader.cache_clear()
    reader = gguf_metadata.open_gguf(smollm2_path)
    assert isinstance(reader, GGUFFile)
    assert len(gguf_metadata.gguf_field(reader, "tokenizer.ggml.tokens")) == 49152


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(path))

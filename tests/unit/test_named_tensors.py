"""The wire format of weight updates (piston.step.named_tensors): exact round trips, size
batches, and clear errors for what cannot be a weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from piston.step import named_tensors as nt


def test_numpy_and_torch_tensors_round_trip_exactly():
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    name, back = nt.to_numpy(nt.encode("w", a))
    assert name == "w" and back.dtype == np.float32 and np.array_equal(back, a)
    t = torch.randn(5, 3).t()  # not contiguous
    _, back = nt.to_numpy(nt.encode("t", t))
    assert np.array_equal(back, t.numpy())
    b = torch.randn(4, 6).to(torch.bfloat16)
    name, dtype, shape, data = nt.check(nt.encode("b", b))
    assert (dtype, shape) == ("bfloat16", (4, 6))
    assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.bfloat16).reshape(shape), b)


def test_batches_stay_under_the_byte_limit_and_keep_the_order():
    tensors = [(f"w{i}", np.zeros(100, np.float32)) for i in range(10)]  # 400 bytes each
    batches = list(nt.batches(tensors, max_bytes=1000))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 2]
    assert [w[0] for b in batches for w in b] == [f"w{i}" for i in range(10)]
    assert [len(b) for b in nt.batches([("big", np.zeros(1000, np.float32))], max_bytes=10)] == [1]


def test_what_is_not_a_weight_is_refused_by_name():
    with pytest.raises(TypeError, match="w: expected a torch tensor or a numpy array"):
        nt.encode("w", [1.0, 2.0])
    with pytest.raises(TypeError, match="complex64 is not a weight dtype"):
        nt.encode("w", np.zeros(2, np.complex64))
    with pytest.raises(TypeError, match="non-empty string"):
        nt.encode("", np.zeros(2, np.float32))
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs"):
        list(nt.batches([np.zeros(2, np.float32)]))
    with pytest.raises(ValueError, match="12 bytes do not make a float32 tensor of shape"):
        nt.check(["w", "float32", [2, 2], b"\0" * 12])

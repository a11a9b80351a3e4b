"""PinnedStaging (GPU only): staged arrays arrive intact in one copy; overflow still works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (pinned memory, events)")


def test_staged_arrays_arrive_after_one_flush_and_survive_the_next_step():
    from piston_cuda.staging import PinnedStaging

    staging = PinnedStaging(4096, torch.device("cuda"))
    arrays = [np.arange(7, dtype=np.int32), np.arange(12, dtype=np.int64).reshape(3, 4) * 3,
              np.linspace(0, 1, 5, dtype=np.float32), np.zeros(0, dtype=np.int32)]
    staging.reset()
    tensors = staging.stage(*arrays)
    staging.flush()
    for a, t in zip(arrays, tensors):
        assert t.device.type == "cuda" and t.shape == a.shape
        assert np.array_equal(t.cpu().numpy(), a)
    big = np.arange(2000, dtype=np.int64)  # does not fit: copied on its own
    staging.reset()
    (t,) = staging.stage(big)
    staging.flush()
    assert np.array_equal(t.cpu().numpy(), big)

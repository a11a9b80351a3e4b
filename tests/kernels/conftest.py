"""Kernel tests of the CUDA platform's Triton kernels.

On a machine with a GPU they run there (bfloat16 and float16). Without one they run on the
CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before any kernel module is
imported) in float32 and float16; the interpreter computes bfloat16 wrongly. Without
Triton they skip.
"""

from __future__ import annotations

import os

import pytest

try:
    import torch

    ON_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a test dependency
    ON_GPU = False

if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device():
    pytest.importorskip("triton")
    return torch.device("cuda" if ON_GPU else "cpu")

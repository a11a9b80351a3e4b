"""PinnedStaging: a step's host arrays reach the GPU in one non-blocking copy.

``stage(*arrays)`` copies numpy arrays into a pinned host buffer, one after another at
64-byte aligned offsets, and returns views of the same offsets in a device buffer;
``flush()`` issues one asynchronous copy of everything staged since the last flush. The
views may be handed to kernels right away: the stream runs the copy before them.

A CUDA event guards the host buffer: ``reset()`` (at the start of each step) waits until
the last copy has read it, so the CPU never overwrites bytes still in flight. Arrays that
do not fit are copied on their own (correct, just not batched).
"""

from __future__ import annotations

import numpy as np
import torch

ALIGN = 64


class PinnedStaging:
    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.nbytes = nbytes
        self.device = device
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.host_np = self.host.numpy()
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.used = 0  # bytes staged this step
        self.flushed = 0  # bytes already copied this step
        self.copy_done = torch.cuda.Event()
        self.pending = False

    def reset(self) -> None:
        """Start a new step: wait for the previous copy to leave the host buffer."""
        if self.pending:
            self.copy_done.synchronize()
            self.pending = False
        self.used = self.flushed = 0

    def stage(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        out = []
        for a in arrays:
            a = np.ascontiguousarray(a)
            off = -(-self.used // ALIGN) * ALIGN
            if off + a.nbytes > self.nbytes:
                out.append(torch.from_numpy(a).to(self.device))
                continue
            self.host_np[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
            dtype = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
            out.append(self.dev[off:off + a.nbytes].view(dtype).view(a.shape))
            self.used = off + a.nbytes
        return out

    def flush(self) -> None:
        """Copy everything staged since the last flush to the device (asynchronously)."""
        if self.used == self.flushed:
            return
        lo, hi = self.flushed, self.used
        self.dev[lo:hi].copy_(self.host[lo:hi], non_blocking=True)
        self.copy_done.record()
        self.pending = True
        self.flushed = hi

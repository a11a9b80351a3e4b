"""One float32 buffer reused for large results (the logits) from step to step.

glibc serves every allocation over 32 MB with a fresh ``mmap`` and unmaps it on ``free``,
so a step's logits (256 rows of a 49k vocabulary are 50 MB, 64 rows of Gemma 3's 262k are
67 MB) start from untouched pages every step, and the kernel zero-fills each 4 KiB page on
its first write. Writing them into a buffer kept from the last step avoids that: the tiny
model's lm_head took 35 ms per step at 256 rows, 25 ms into a kept buffer
(benchmarks/RESULTS.md). The buffer is handed out again only when nothing else holds it
(its storage's use count is back to what it was when it was made), so a caller that keeps
the previous result, or a view of it, gets a fresh tensor instead, never one overwritten.
"""

from __future__ import annotations

import torch

# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): from this size on,
# every allocation is a fresh mapping.
LARGE_BYTES = 32 << 20

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class ReusedOutput:
    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.idle_count = 0

    def take(self, rows: int, cols: int) -> torch.Tensor | None:
        """A [rows, cols] float32 tensor on the kept buffer (grown to fit), or None when the
        buffer is still in use or this torch cannot tell."""
        if _use_count is None:
            return None
        n = rows * cols
        if self.buffer is None or self.buffer.numel() < n:
            if self.buffer is not None and not self._idle():
                return None
            self.buffer = None  # free the smaller one first
            self.buffer = torch.empty(n, dtype=torch.float32)
            self.idle_count = _use_count(self.buffer.untyped_storage()._cdata)
        elif not self._idle():
            return None
        return self.buffer[:n].view(rows, cols)

    def _idle(self) -> bool:
        return _use_count(self.buffer.untyped_storage()._cdata) == self.idle_count

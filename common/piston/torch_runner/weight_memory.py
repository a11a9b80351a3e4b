"""WeightMemory: frees the memory behind a torch model's weights for sleep mode, and gives
it back.

Every parameter and buffer keeps its Python object (compiled pieces, the CPU kernels and
a layer's ``segments`` list hold those objects, not their memory): only its ``.data``
is swapped for an empty tensor and, on restore, for a view of fresh memory with the same
dtype, shape, strides and offset. Tensors that share memory (tied embeddings) share it
again after a restore. Where a copy is kept:

- "host": a tensor in host memory (pinned when the weights are on a GPU);
- "file": a temporary file (unlinked at once), for the CPU, where host memory is the
  device memory that sleep must give back; the OS keeps it in its page cache while it
  has room, outside the process's resident memory;
- None: no copy (sleep level 2); the caller refills the weights after ``restore``.

A CUDA graph captured before a restore points at the old memory: its worker re-captures.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class _Block:
    """One piece of memory and the tensors that view it."""

    nbytes: int
    device: torch.device
    views: list[tuple[torch.Tensor, int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    copy: torch.Tensor | None = None  # "host"
    file_offset: int = -1  # "file"


class WeightMemory:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks: list[_Block] = []
        self.file: Any = None
        self.released = False

    def _tensors(self) -> list[torch.Tensor]:
        seen: set[int] = set()
        out = []
        for module in self.model.modules():
            for t in (*module._parameters.values(), *module._buffers.values()):
                if t is not None and t.numel() and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes released (0 when nothing is)."""
        return sum(b.nbytes for b in self.blocks)

    @torch.no_grad()
    def release(self, keep: str | None) -> int:
        """Free every weight's memory, keeping a copy in ``keep`` ("host", "file" or None).
        Returns the bytes freed."""
        if self.released:
            return 0
        if keep not in ("host", "file", None):
            raise ValueError(f"keep={keep!r}: use 'host', 'file' or None.")
        by_storage: dict[tuple[str, int], _Block] = {}
        for t in self._tensors():
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            block = by_storage.get(key)
            if block is None:
                block = by_storage[key] = _Block(storage.nbytes(), t.device)
                raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                if keep == "host":
                    block.copy = torch.empty(block.nbytes, dtype=torch.uint8,
                                             pin_memory=t.device.type == "cuda" and torch.cuda.is_available())
                    block.copy.copy_(raw)
                elif keep == "file":
                    if self.file is None:
                        self.file = tempfile.TemporaryFile(prefix="piston-sleep-")
                    block.file_offset = self.file.tell()
                    self.file.write(memoryview(raw.cpu().numpy()))
                del raw
            block.views.append((t, t.storage_offset(), tuple(t.shape), tuple(t.stride())))
        self.blocks = list(by_storage.values())
        for block in self.blocks:
            for t, *_ in block.views:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        if self.file is not None:
            self.file.flush()
        self.released = True
        return self.nbytes

    @torch.no_grad()
    def restore(self) -> bool:
        """Give every released weight fresh memory, filled from the copy when one was kept.
        Returns whether the contents came back (False after ``release(None)``: the caller
        must refill them)."""
        if not self.released:
            return True
        filled = True
        for block in self.blocks:
            raw = torch.empty(block.nbytes, dtype=torch.uint8, device=block.device)
            if block.copy is not None:
                raw.copy_(block.copy, non_blocking=False)
            elif block.file_offset >= 0:
                self.file.seek(block.file_offset)
                if block.device.type == "cpu":
                    self.file.readinto(memoryview(raw.numpy()))
                else:
                    host = torch.empty(block.nbytes, dtype=torch.uint8)
                    self.file.readinto(memoryview(host.numpy()))
                    raw.copy_(host)
            else:
                filled = False
            storage = raw.untyped_storage()
            for t, offset, shape, stride in block.views:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, offset, shape, stride)
        self.blocks = []
        if self.file is not None:
            self.file.close()
            self.file = None
        self.released = False
        return filled

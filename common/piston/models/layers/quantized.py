"""PackedWeight: a linear or embedding weight held in its quantized format, not as floats.

A layer whose checkpoint tensors come packed (a GGUF file's Q4_0 ... Q6_K, F16 and BF16
tensors; see piston.checkpoint.packed), or that quantizes its float weight to int8 at
load (``--quantization int8``), keeps a PackedWeight instead of a float ``weight``.

The weight is a list of segments of output rows, each one uint8 rows ``[rows,
row_bytes]`` in one format. A fused layer's shards (q, k and v; gate and up) are
concatenated into one segment when they share a format, and stay separate segments
when they do not (Q4_K_M files keep v in Q6_K beside a Q4_K q and k). A float shard
among packed ones becomes an F32 segment.

The torch fallback (``linear``, ``embedding``) dequantizes on every call, on the rows'
device, so every platform runs packed weights; a platform sets a faster kernel in the
layer's ``qkernel`` slot that reads ``segments``, ``codes`` and ``in_features``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from piston.checkpoint.packed import FORMATS, PackedArray, as_packed, concat_rows, quantize_int8
from piston.models.layers.quant_formats import dequantize

logger = logging.getLogger(__name__)


class PackedWeight(nn.Module):
    """``out_features`` rows of ``in_features`` values, made of the shards ``shard_rows``
    (``(shard_id, rows)`` in output order), filled with ``add`` at load.

    ``quantize="int8"``: float shards are quantized to int8 per output row (format I8)
    rather than kept as F32.
    """

    def __init__(self, in_features: int, shard_rows: Sequence[tuple[Any, int]], quantize: str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_rows = list(shard_rows)
        self.out_features = sum(rows for _, rows in self.shard_rows)
        self.quantize = quantize
        self.dtype = torch.get_default_dtype()  # of what the fallback returns: the model's
        # Moved with the module (to_empty, .to), so ``add`` knows where the segments go.
        self.register_buffer("device_marker", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.pending: dict[Any, PackedArray] = {}
        self.formats: tuple[str, ...] = ()
        self.codes: tuple[int, ...] = ()
        self.segment_rows: tuple[int, ...] = ()
        self.segments: list[torch.Tensor] = []

    @property
    def loaded(self) -> bool:
        return bool(self.segments)

    def add(self, shard_id: Any, tensor: Any, name: str = "weight") -> None:
        """One shard: a PackedArray, or a float array or tensor. Shorter shards than
        expected (an embedding's last tensor-parallel rank) are padded with zero rows."""
        expected = dict(self.shard_rows)[shard_id]
        part = tensor if isinstance(tensor, PackedArray) else _as_numpy(tensor)
        if self.quantize == "int8" and not isinstance(part, PackedArray):
            part = quantize_int8(part)
        part = as_packed(part)
        if part.cols != self.in_features or part.shape[0] > expected:
            raise ValueError(f"Checkpoint tensor for {name} has shape {part.shape}, but this rank expects "
                             f"({expected}, {self.in_features}): the config does not match the weights.")
        if part.shape[0] < expected:
            pad = np.zeros((expected - part.shape[0], part.data.shape[1]), dtype=np.uint8)  # zeros decode to 0
            part = PackedArray(part.fmt, np.concatenate([part.data, pad]), part.cols)
        self.pending[shard_id] = part
        if len(self.pending) == len(self.shard_rows):
            self._finalize()

    def _finalize(self) -> None:
        parts = [self.pending.pop(shard_id) for shard_id, _ in self.shard_rows]
        groups: list[list[PackedArray]] = []
        for part in parts:  # neighbours of one format become one segment
            if groups and groups[-1][0].fmt == part.fmt:
                groups[-1].append(part)
            else:
                groups.append([part])
        device = self.device_marker.device
        self.formats = tuple(g[0].fmt for g in groups)
        self.codes = tuple(FORMATS[f].code for f in self.formats)
        self.segment_rows = tuple(sum(p.shape[0] for p in g) for g in groups)
        self.segments = []
        for i, group in enumerate(groups):
            data = concat_rows(group).data if len(group) > 1 else group[0].data
            if not _owns_its_memory(data):
                data = np.array(data, copy=True)
            segment = torch.from_numpy(data).to(device)
            self.register_buffer(f"segment{i}", segment, persistent=False)
            self.segments.append(segment)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(): keep ``segments`` pointing at the moved buffers
        out = super()._apply(fn, recurse)
        self.segments = [getattr(self, f"segment{i}") for i in range(len(self.segments))]
        return out

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.segments)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out_features, in_features]``."""
        parts = [dequantize(s, f, self.in_features, dtype or self.dtype) for s, f in zip(self.segments, self.formats)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The torch fallback of a ``qkernel``: ``x @ W.T + bias``, dequantizing W."""
        return F.linear(x, self.dequantize(x.dtype), bias)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight (the torch fallback of a ``qembed_kernel``): only
        those rows are dequantized."""
        if len(self.segments) != 1:
            return F.embedding(ids, self.dequantize())
        return dequantize(self.segments[0][ids.reshape(-1)], self.formats[0], self.in_features,
                          self.dtype).reshape(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{f} x {r}" for f, r in zip(self.formats, self.segment_rows))
        return f"in={self.in_features}, out={self.out_features}, segments=[{parts}]"


def _owns_its_memory(a: np.ndarray) -> bool:
    """Whether ``a`` is all of the memory it lives in: not a slice of a larger array, nor a
    view of a memory-mapped file (keeping either would keep the rest resident too)."""
    base = a.base
    return a.flags.c_contiguous and (base is None or (type(base) is np.ndarray and base.base is None
                                                     and base.nbytes == a.nbytes))


def _as_numpy(tensor: Any) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        return tensor
    if not isinstance(tensor, torch.Tensor):  # a lazy safetensors slice
        tensor = tensor[:]
    return tensor.detach().to("cpu", torch.float32).numpy()


def describe_packed(model: nn.Module) -> str:
    """One line on a model's packed weights: formats, layers and bytes."""
    counts: dict[str, int] = {}
    total = layers = 0
    for module in model.modules():
        if isinstance(module, PackedWeight) and module.loaded:
            layers += 1
            total += module.nbytes
            for fmt, seg in zip(module.formats, module.segments):
                counts[fmt] = counts.get(fmt, 0) + seg.numel()
    formats = ", ".join(f"{fmt} {n / 1e6:.1f} MB" for fmt, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{layers} packed weights, {total / 1e6:.1f} MB ({formats})"

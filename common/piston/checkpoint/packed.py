"""Weights kept in a quantized format: the formats Piston serves packed, and a tensor as rows of bytes.

A packed 2-D weight ``[rows, cols]`` is a uint8 array ``[rows, row_bytes]``: each row is
its own run of blocks, so rows can be sliced, permuted and concatenated as bytes, and a
tensor-parallel rank takes its output rows without decoding anything.

- The GGUF formats keep llama.cpp's block layout (``gguf.quants`` documents each one):
  Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 in blocks of 32 values; Q4_K, Q5_K and Q6_K in
  super-blocks of 256. F16 and BF16 are rows of 16-bit floats, F32 of 32-bit ones (a
  float tensor fused with packed ones, e.g. a float v next to a quantized q and k).
- ``I8`` is Piston's own: symmetric int8 per output row, ``--quantization int8``. A row is
  its float32 scale followed by ``cols`` int8 values; the weight is ``q * scale``.

Everything here is numpy: the torch models wrap the rows as uint8 tensors, the JAX
models read dequantized arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantFormat:
    name: str
    code: int  # ggml's type id (GGMLQuantizationType); I8 has Piston's own
    block: int  # values per block
    block_bytes: int

    def row_bytes(self, cols: int) -> int:
        if self.name == "I8":
            return 4 + cols
        if cols % self.block:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.block} values; got {cols} columns.")
        return cols // self.block * self.block_bytes


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("F32", 0, 1, 4),
    QuantFormat("F16", 1, 1, 2),
    QuantFormat("BF16", 30, 1, 2),
    QuantFormat("Q4_0", 2, 32, 18),
    QuantFormat("Q4_1", 3, 32, 20),
    QuantFormat("Q5_0", 6, 32, 22),
    QuantFormat("Q5_1", 7, 32, 24),
    QuantFormat("Q8_0", 8, 32, 34),
    QuantFormat("Q4_K", 12, 256, 144),
    QuantFormat("Q5_K", 13, 256, 176),
    QuantFormat("Q6_K", 14, 256, 210),
    QuantFormat("I8", 1000, 1, 1),
)}
# GGUF tensor types that stay packed in memory; any other type is dequantized at load.
GGUF_PACKED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16")
# The values ``quantization`` may take (ModelConfig, --quantization); None = "auto".
QUANTIZATION_MODES = ("auto", "gguf", "int8", "none")


@dataclass
class PackedArray:
    """A 2-D weight ``[rows, cols]`` in format ``fmt``, as ``data``: uint8 ``[rows, row_bytes]``."""

    fmt: str
    data: np.ndarray
    cols: int

    def __post_init__(self) -> None:
        expected = FORMATS[self.fmt].row_bytes(self.cols)
        if self.data.dtype != np.uint8 or self.data.ndim != 2 or self.data.shape[1] != expected:
            raise ValueError(f"{self.fmt} data for {self.cols} columns must be uint8 [rows, {expected}], "
                             f"got {self.data.dtype} {tuple(self.data.shape)}.")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def aligned(self, start: int, length: int) -> bool:
        """Whether columns ``start..start+length`` are whole blocks (so slicing keeps them packed)."""
        block = FORMATS[self.fmt].block
        return self.fmt != "I8" and start % block == 0 and length % block == 0

    def narrow(self, dim: int, start: int, length: int) -> "PackedArray | np.ndarray":
        """Rows (``dim`` 0) or columns (1) ``start..start+length``. Columns that cut through
        blocks (or an I8 row, whose scale covers the whole row) come back dequantized."""
        if dim == 0:
            return PackedArray(self.fmt, self.data[start:start + length], self.cols)
        if not self.aligned(start, length):
            return self.dequantize()[:, start:start + length]
        fmt = FORMATS[self.fmt]
        first, end = start // fmt.block * fmt.block_bytes, (start + length) // fmt.block * fmt.block_bytes
        return PackedArray(self.fmt, self.data[:, first:end], length)

    def dequantize(self) -> np.ndarray:
        """The float32 values ``[rows, cols]``."""
        return dequantize_rows(self.fmt, self.data, self.cols)


def dequantize_rows(fmt: str, data: np.ndarray, cols: int) -> np.ndarray:
    """Float32 ``[rows, cols]`` from packed rows ``data`` (any format of FORMATS)."""
    data = np.ascontiguousarray(data)
    rows = data.shape[0]
    if fmt == "F32":
        return data.view(np.float32).reshape(rows, cols).copy()
    if fmt == "I8":
        scale = data[:, :4].copy().view(np.float32)
        return data[:, 4:].view(np.int8).astype(np.float32) * scale
    if fmt == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    if fmt == "F16":
        return data.view(np.float16).astype(np.float32).reshape(rows, cols)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = dequantize(data, GGMLQuantizationType[fmt])
    return np.asarray(out, dtype=np.float32).reshape(rows, cols)


def int8_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along the last axis: ``(q, scale)`` with ``scale = max|w| / 127`` per
    row (shape ``w.shape[:-1]``, float32) and ``q = round(w / scale)``; ``q * scale`` is
    the weight served. Every platform quantizes with this, so they serve the same values."""
    w = np.asarray(weight, dtype=np.float32)
    scale = (np.abs(w).max(axis=-1, keepdims=True) / 127.0).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint(w * inv), -127, 127).astype(np.int8)
    return q, scale[..., 0]


def quantize_int8(weight: np.ndarray) -> PackedArray:
    """A 2-D weight as I8 rows (int8_rows: symmetric per output row)."""
    if np.ndim(weight) != 2:
        raise ValueError(f"int8 quantization takes a 2-D weight, got shape {np.shape(weight)}.")
    q, scale = int8_rows(weight)
    data = np.empty((q.shape[0], 4 + q.shape[1]), dtype=np.uint8)
    data[:, :4] = scale.reshape(-1, 1).view(np.uint8)
    data[:, 4:] = q.view(np.uint8)
    return PackedArray("I8", data, q.shape[1])


def as_packed(tensor: "PackedArray | np.ndarray") -> PackedArray:
    """A packed array as it is; a float array as F32 rows."""
    if isinstance(tensor, PackedArray):
        return tensor
    w = np.ascontiguousarray(tensor, dtype=np.float32)
    return PackedArray("F32", w.view(np.uint8).reshape(w.shape[0], -1), w.shape[1])


def concat_rows(parts: list[PackedArray]) -> PackedArray:
    """One array of the parts' rows, in order (all of one format and width)."""
    fmt, cols = parts[0].fmt, parts[0].cols
    if any(p.fmt != fmt or p.cols != cols for p in parts):
        raise ValueError("concat_rows: the parts differ in format or width.")
    return PackedArray(fmt, np.concatenate([p.data for p in parts], axis=0), cols)


def resolve_quantization(mode: str | None, path: str) -> str:
    """What ``quantization`` means for the checkpoint at ``path``: "gguf", "int8" or "none"
    (None and "auto": "gguf" for a .gguf file, else "none"). Raises ValueError for a mode
    the checkpoint cannot take."""
    mode = mode or "auto"
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}.")
    is_gguf = path.endswith(".gguf")
    if mode == "auto":
        return "gguf" if is_gguf else "none"
    if mode == "gguf" and not is_gguf:
        raise ValueError(f"quantization='gguf' serves a .gguf file's packed weights; {path} is not one "
                         "(use int8 to quantize a float checkpoint).")
    return mode

"""A GGUF file's header, read directly: metadata and tensor infos in milliseconds.

``gguf.GGUFReader`` makes a numpy view of every part of every metadata value: SmolLM2's
49,152 tokens and 48,900 merges cost about 2.5 s per process, paid by the front end and the
engine alike on every start. ``GGUFFile`` walks the header with ``struct`` over a memory
map instead, keeps each value's place in the file and decodes it only when asked, and gives
each tensor the same fields and lazy ``data`` view as gguf's ``ReaderTensor``.

Only little-endian files (every file llama.cpp writes on x86 and ARM): ``open_gguf`` hands
others to ``gguf.GGUFReader``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = 0x46554747  # "GGUF", read little-endian
STRING, ARRAY = 8, 9
# GGUF value type -> struct format (little-endian)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# Tensor types whose data gguf's reader views as numbers rather than bytes.
_ITEM_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}


class NotLittleEndian(ValueError):
    pass


class Field:
    """One metadata value: ``types`` as gguf gives them ([type] or [ARRAY, element type]),
    ``contents()`` the Python value (a list for arrays)."""

    def __init__(self, buf, vtype: int, offset: int, etype: int | None = None) -> None:
        self._buf, self._offset = buf, offset
        self.types = [vtype] if etype is None else [vtype, etype]

    def contents(self) -> Any:
        value, _ = _read_value(self._buf, self.types[0], self._offset)
        return value


@dataclass
class Tensor:
    """The fields of ``gguf.ReaderTensor`` that Piston reads. ``shape``: the dimensions as
    stored (innermost first); ``data``: a view of the file, shaped and typed as gguf's."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    _buf: Any

    @property
    def data(self) -> np.ndarray:
        from gguf.quants import quant_shape_to_byte_shape

        np_dims = tuple(int(d) for d in reversed(self.shape.tolist()))
        item = _ITEM_TYPES.get(self.tensor_type.name)
        if item is not None:
            return np.frombuffer(self._buf, dtype=item, count=self.n_elements, offset=self.data_offset
                                 ).reshape(np_dims)
        return np.frombuffer(self._buf, dtype=np.uint8, count=self.n_bytes, offset=self.data_offset
                             ).reshape(quant_shape_to_byte_shape(np_dims, self.tensor_type))


class GGUFFile:
    """``fields`` ({key: Field}) and ``tensors`` (a list of Tensor) of a GGUF file, as
    ``gguf.GGUFReader`` has them."""

    def __init__(self, path: str) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._buf
        magic, version = struct.unpack_from("<II", buf, 0)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        if version & 0xFFFF == 0:
            raise NotLittleEndian(path)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key, off = _read_string(buf, off)
            (vtype,), off = struct.unpack_from("<I", buf, off), off + 4
            etype = struct.unpack_from("<I", buf, off)[0] if vtype == ARRAY else None
            self.fields[key] = Field(buf, vtype, off, etype)
            off = _skip_value(buf, vtype, off)
        infos = []
        for _ in range(n_tensors):
            name, off = _read_string(buf, off)
            (n_dims,), off = struct.unpack_from("<I", buf, off), off + 4
            dims = np.frombuffer(buf, dtype="<u8", count=n_dims, offset=off).copy()
            off += 8 * n_dims
            raw_type, rel = struct.unpack_from("<IQ", buf, off)
            off += 12
            infos.append((name, dims, raw_type, rel))
        alignment = self.fields["general.alignment"].contents() if "general.alignment" in self.fields else 32
        start = -(-off // alignment) * alignment
        self.tensors: list[Tensor] = []
        for name, dims, raw_type, rel in infos:
            ggml_type = GGMLQuantizationType(raw_type)
            n_elems = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            self.tensors.append(Tensor(name, ggml_type, dims, n_elems, n_elems * type_size // block, start + rel,
                                       buf))


def _read_string(buf, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    return bytes(buf[off + 8:off + 8 + n]).decode("utf-8"), off + 8 + n


def _read_value(buf, vtype: int, off: int) -> tuple[Any, int]:
    """The value of type ``vtype`` at ``off`` and the offset after it."""
    if vtype == STRING:
        return _read_string(buf, off)
    if vtype != ARRAY:
        fmt = _SCALAR[vtype]
        return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
    etype, count = struct.unpack_from("<IQ", buf, off)
    off += 12
    if etype in _NUMPY:
        dtype = np.dtype(_NUMPY[etype]).newbyteorder("<")
        return np.frombuffer(buf, dtype=dtype, count=count, offset=off).tolist(), off + count * dtype.itemsize
    items = []
    for _ in range(count):
        item, off = _read_value(buf, etype, off)
        items.append(item)
    return items, off


def _skip_value(buf, vtype: int, off: int) -> int:
    """The offset after the value of type ``vtype`` at ``off``, without decoding it."""
    if vtype == STRING:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    if vtype != ARRAY:
        return off + struct.calcsize(_SCALAR[vtype])
    etype, count = struct.unpack_from("<IQ", buf, off)
    off += 12
    if etype in _NUMPY:
        return off + count * np.dtype(_NUMPY[etype]).itemsize
    if etype == STRING:
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            off += 8 + unpack(buf, off)[0]
        return off
    for _ in range(count):
        off = _skip_value(buf, etype, off)
    return off

"""Named weight tensors on the wire, for in-place weight updates (``LLM.update_weights``).

A weight update travels from the caller to every worker through the engine's utility
calls (msgpack) and the executor's RPC. Neither knows torch or JAX, so a tensor goes as
``[name, dtype, shape, raw bytes]``: the dtype by its torch/numpy name ("float32",
"bfloat16", ...), the bytes in C order. Each platform turns the bytes back into its own
arrays (``to_numpy`` here; the torch runner uses ``torch.frombuffer``).

No torch and no JAX are imported: a torch tensor given by the caller is read through
the torch module that made it.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator

import numpy as np

# [name, dtype, shape, data]
WireTensor = list

# Dtypes a weight may have; bfloat16 has no numpy dtype (ml_dtypes gives one where JAX is).
DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int32", "int64")

# One update message stays under this many bytes of tensor data; LLM.update_weights splits
# a larger state dict into several calls (msgpack copies each message whole).
MAX_UPDATE_BYTES = 512 * 2**20


def encode(name: str, tensor: Any) -> WireTensor:
    """``tensor`` (a torch tensor on any device, or a numpy array) as a wire tensor."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a weight name must be a non-empty string, got {name!r}.")
    if type(tensor).__module__.startswith("torch"):
        torch = sys.modules["torch"]
        t = tensor.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        shape = list(t.shape)
    elif isinstance(tensor, np.ndarray):
        dtype = tensor.dtype.name
        data = np.ascontiguousarray(tensor).tobytes()
        shape = list(tensor.shape)
    else:
        raise TypeError(f"weight {name}: expected a torch tensor or a numpy array, got {type(tensor).__name__}.")
    if dtype not in DTYPES:
        raise TypeError(f"weight {name}: dtype {dtype} is not a weight dtype; use one of {', '.join(DTYPES)}.")
    return [name, dtype, shape, data]


def batches(named_tensors: Iterable[tuple[str, Any]], max_bytes: int = MAX_UPDATE_BYTES
            ) -> Iterator[list[WireTensor]]:
    """``(name, tensor)`` pairs encoded, in lists of at most ``max_bytes`` of data (a
    larger single tensor goes alone)."""
    batch: list[WireTensor] = []
    size = 0
    for item in named_tensors:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"named_tensors must yield (name, tensor) pairs, got {type(item).__name__}.")
        wire = encode(*item)
        if batch and size + len(wire[3]) > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(wire)
        size += len(wire[3])
    if batch:
        yield batch


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:
            raise TypeError("a bfloat16 weight needs the ml_dtypes package here (JAX installs it).") from e
        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise TypeError(f"dtype {name} is not a weight dtype; use one of {', '.join(DTYPES)}.")
    return np.dtype(name)


def check(wire: WireTensor) -> tuple[str, str, tuple[int, ...], bytes]:
    """A wire tensor's fields, checked: the data must be exactly shape x itemsize bytes."""
    if not (isinstance(wire, (list, tuple)) and len(wire) == 4):
        raise TypeError("a wire tensor is [name, dtype, shape, data].")
    name, dtype, shape, data = wire
    shape = tuple(int(s) for s in shape)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1,
                "int32": 4, "int64": 8}.get(dtype)
    if itemsize is None:
        raise TypeError(f"weight {name}: dtype {dtype} is not a weight dtype; use one of {', '.join(DTYPES)}.")
    if len(data) != int(np.prod(shape, dtype=np.int64)) * itemsize:
        raise ValueError(f"weight {name}: {len(data)} bytes do not make a {dtype} tensor of shape {shape}.")
    return name, dtype, shape, data


def to_numpy(wire: WireTensor) -> tuple[str, np.ndarray]:
    """``(name, array)``; the array is a read-only view of the message's bytes."""
    name, dtype, shape, data = check(wire)
    return name, np.frombuffer(data, dtype=numpy_dtype(dtype)).reshape(shape)

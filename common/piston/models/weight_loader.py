"""Safetensors tensors for the torch models, lazily: a tensor-parallel rank reads its shard only.

Which files a folder has, and reading without torch, is piston.checkpoint's; this module
adds torch's lazy slices and the helpers the sharded layers use on tensors and slices alike.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open

from piston.checkpoint.packed import PackedArray
from piston.checkpoint.safetensors_files import safetensors_files


def iterate_safetensors(folder: str, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield ``(hf_name, tensor)`` for every tensor of the folder, one file at a time.

    With ``lazy``, yield safetensors slices instead: nothing is read until the model's
    loader indexes them, so a tensor-parallel rank reads only its own shard.
    """
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


def shape_of(t: Any) -> tuple[int, ...]:
    """Shape of a tensor, a numpy or packed array, or a lazy safetensors slice."""
    if isinstance(t, (torch.Tensor, np.ndarray, PackedArray)):
        return tuple(t.shape)
    return tuple(t.get_shape())


def narrow(t: Any, dim: int, start: int, length: int) -> Any:
    """``t.narrow(dim, start, length)`` for a tensor, a numpy or packed array (whose
    columns come back dequantized when they cut through its blocks) or a lazy slice
    (reads only that part)."""
    if isinstance(t, (torch.Tensor, PackedArray)):
        return t.narrow(dim, start, length)
    if isinstance(t, np.ndarray):
        return np.take(t, np.arange(start, start + length), axis=dim) if dim else t[start:start + length]
    index = [slice(None)] * len(t.get_shape())
    index[dim] = slice(start, start + length)
    return t[tuple(index)]


def materialize(t: Any) -> torch.Tensor:
    """The tensor itself; a numpy array as a tensor; a packed array dequantized; a lazy
    slice read in full."""
    if isinstance(t, PackedArray):
        t = t.dequantize()
    if isinstance(t, np.ndarray):
        return torch.from_numpy(t)
    return t if isinstance(t, torch.Tensor) else t[:]

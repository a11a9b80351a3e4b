"""Safetensors tensors for the torch models, lazily: a tensor-parallel rank reads its shard only.

Which files a folder has, and reading without torch, is piston.checkpoint's; this module
adds torch's lazy slices and the helpers the sharded layers use on tensors and slices alike.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from safetensors import safe_open

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
    """Shape of a tensor or of a lazy safetensors slice."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


def narrow(t: Any, dim: int, start: int, length: int) -> Any:
    """``t.narrow(dim, start, length)`` for a tensor or a lazy slice (reads only that part)."""
    if isinstance(t, torch.Tensor):
        return t.narrow(dim, start, length)
    index = [slice(None)] * len(t.get_shape())
    index[dim] = slice(start, start + length)
    return t[tuple(index)]


def materialize(t: Any) -> torch.Tensor:
    """The tensor itself, or a lazy slice read in full."""
    return t if isinstance(t, torch.Tensor) else t[:]

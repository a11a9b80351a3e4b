"""Tensors of a Hugging Face model folder, read from its safetensors files."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

import torch
from safetensors import safe_open


def safetensors_files(folder: str) -> list[str]:
    """The folder's safetensors files: the shards its index names, else every *.safetensors.

    Raises FileNotFoundError when there are none (PyTorch .bin checkpoints are not read).
    """
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(absent[:3])}.")
        return files
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        return files
    has_bin = glob.glob(os.path.join(folder, "*.bin")) or glob.glob(os.path.join(folder, "*.pt"))
    hint = (" It has PyTorch .bin weights, which Piston does not load: convert them to "
            "safetensors (save_pretrained(..., safe_serialization=True)).") if has_bin else ""
    raise FileNotFoundError(f"No .safetensors weights in {folder}.{hint}")


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


def count_safetensors(folder: str) -> int:
    """How many tensors ``iterate_safetensors`` will yield (for a progress bar)."""
    total = 0
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            total += len(list(f.keys()))
    return total

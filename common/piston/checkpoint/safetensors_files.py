"""The safetensors files of a Hugging Face model folder."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import numpy as np


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


def count_safetensors(folder: str) -> int:
    """How many tensors the folder's safetensors files hold (for a progress bar)."""
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(folder):
        with safe_open(path, framework="numpy") as f:
            total += len(list(f.keys()))
    return total


def iterate_safetensors(folder: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every tensor of the folder, one file at a time."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

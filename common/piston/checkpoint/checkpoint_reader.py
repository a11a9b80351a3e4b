"""CheckpointReader: where a model's weights come from, and their tensors as numpy arrays.

A model folder is read as it is. A GGUF file is read from its converted copy when one is
cached (piston.checkpoint.gguf_cache); otherwise it is dequantized, and the arrays are
recorded on the way and written as that copy once every tensor has been read.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from piston.checkpoint import gguf_cache
from piston.checkpoint.gguf_tensors import count_gguf_tensors, iterate_gguf_tensors
from piston.checkpoint.safetensors_files import count_safetensors, iterate_safetensors
from piston.step.hf_config import load_hf_config


def read_hf_config(path: str) -> Any:
    """The Hugging Face config of the model folder or .gguf file at ``path``; a GGUF's
    converted copy, when cached, gives it from config.json, faster than its metadata."""
    return load_hf_config((path.endswith(".gguf") and gguf_cache.cached_folder(path)) or path)


class CheckpointReader:
    def __init__(self, path: str, hf_config: Any) -> None:
        self.path = path
        self.hf_config = hf_config
        # A safetensors folder to read (the model's own, or a GGUF's converted copy), or
        # None when the GGUF file itself must be read.
        self.folder: str | None = path
        if path.endswith(".gguf"):
            self.folder = gguf_cache.cached_folder(path)

    def count(self) -> int:
        """How many tensors ``tensors()`` yields (for a progress bar)."""
        return count_gguf_tensors(self.path) if self.folder is None else count_safetensors(self.folder)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(hf_name, array)`` for every tensor, one at a time."""
        if self.folder is not None:
            yield from iterate_safetensors(self.folder)
            return
        converted: dict[str, np.ndarray] = {}
        yield from gguf_cache.recording(iterate_gguf_tensors(self.path, self.hf_config), converted)
        gguf_cache.save(self.path, self.hf_config, converted)

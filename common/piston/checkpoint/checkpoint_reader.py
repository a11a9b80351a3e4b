"""CheckpointReader: where a model's weights come from, and their tensors as numpy arrays.

A model folder is read as it is. A GGUF file read ``packed`` gives its quantized weights
as they are (piston.checkpoint.packed), straight from the file. Read unpacked, it comes
from its converted float32 copy when one is cached (piston.checkpoint.gguf_cache);
otherwise it is dequantized, and the arrays are recorded on the way and written as that
copy once every tensor has been read.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from piston.checkpoint import gguf_cache
from piston.checkpoint.gguf_tensors import count_gguf_tensors, iterate_gguf_tensors, packed_tensor_formats
from piston.checkpoint.packed import PackedArray
from piston.checkpoint.safetensors_files import count_safetensors, iterate_safetensors
from piston.step.hf_config import load_hf_config


def read_hf_config(path: str) -> Any:
    """The Hugging Face config of the model folder or .gguf file at ``path``; a GGUF's
    converted copy, when cached, gives it from config.json, faster than its metadata."""
    return load_hf_config((path.endswith(".gguf") and gguf_cache.cached_folder(path)) or path)


class CheckpointReader:
    """``packed``: a GGUF file's quantized tensors come as PackedArrays (no effect on a folder)."""

    def __init__(self, path: str, hf_config: Any, packed: bool = False) -> None:
        self.path = path
        self.hf_config = hf_config
        self.packed = packed and path.endswith(".gguf")
        # A safetensors folder to read (the model's own, or a GGUF's converted copy), or
        # None when the GGUF file itself must be read.
        self.folder: str | None = path
        if path.endswith(".gguf"):
            self.folder = None if self.packed else gguf_cache.cached_folder(path)

    def packed_formats(self) -> dict[str, str]:
        """``{hf_name: format}`` of the tensors ``tensors()`` yields packed (read from the
        file's tensor list; no data is read)."""
        return packed_tensor_formats(self.path) if self.packed else {}

    def count(self) -> int:
        """How many tensors ``tensors()`` yields (for a progress bar)."""
        return count_gguf_tensors(self.path) if self.folder is None else count_safetensors(self.folder)

    def tensors(self) -> Iterator[tuple[str, np.ndarray | PackedArray]]:
        """``(hf_name, array)`` for every tensor, one at a time."""
        if self.folder is not None:
            yield from iterate_safetensors(self.folder)
            return
        if self.packed:  # nothing to cache: the packed weights are read from the file as they are
            yield from iterate_gguf_tensors(self.path, self.hf_config, packed=True)
            return
        converted: dict[str, np.ndarray] = {}
        yield from gguf_cache.recording(iterate_gguf_tensors(self.path, self.hf_config), converted)
        gguf_cache.save(self.path, self.hf_config, converted)

    def close(self) -> None:
        """Drop the cached GGUF reader, unmapping the file (its pages no longer count in
        this process's resident memory once packed weights were copied out of it)."""
        if self.path.endswith(".gguf"):
            from piston.step import gguf_metadata

            gguf_metadata._reader.cache_clear()

"""A GGUF file's config and dequantized weights, kept as a Hugging Face folder.

Only a GGUF read dequantized uses this copy (``--quantization none``, and platforms that
dequantize GGUF formats, such as the TPU); served packed, the file itself is read.

Reading a GGUF costs seconds (the gguf reader parses the whole token list, then every
tensor is dequantized). The first load writes config.json and model.safetensors under
the cache directory; later start-ups read those instead, memory-mapped, in a fraction
of a second. Only models whose float32 weights fit in ``PISTON_GGUF_CACHE_MAX_BYTES``
(default 4 GB) are cached, so a large GGUF never fills the disk with float32 copies.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 * 10**9
_TOO_BIG = "__too_big__"


def _max_bytes() -> int:
    return int(os.environ.get("PISTON_GGUF_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))


def converted_dir(gguf_path: str) -> str:
    """Where the converted copy of ``gguf_path`` lives (keyed by name, size and mtime)."""
    from piston.model_resolver import cache_dir

    st = os.stat(gguf_path)
    name = f"{os.path.basename(gguf_path)}-{st.st_size}-{int(st.st_mtime)}"
    return os.path.join(cache_dir(), "converted", name)


def cached_folder(gguf_path: str) -> str | None:
    """The converted folder if a complete one exists, else None."""
    if _max_bytes() <= 0:
        return None
    folder = converted_dir(gguf_path)
    return folder if os.path.isfile(os.path.join(folder, "model.safetensors")) else None


def recording(weights: Iterable[tuple[str, np.ndarray]], store: dict[str, np.ndarray]
              ) -> Iterator[tuple[str, np.ndarray]]:
    """Pass weights through, keeping each in ``store`` while their total stays under the limit."""
    limit, total = _max_bytes(), 0
    for name, array in weights:
        total += array.nbytes
        if total <= limit:
            store[name] = array
        else:
            store.clear()
        yield name, array
    if total > limit:
        store[_TOO_BIG] = np.empty(0)


def save(gguf_path: str, hf_config: Any, store: dict[str, np.ndarray]) -> None:
    """Write the converted folder atomically; a failure only costs the next start-up time."""
    if not store or _TOO_BIG in store:
        return
    from safetensors.numpy import save_file

    target = converted_dir(gguf_path)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        hf_config.to_json_file(os.path.join(tmp, "config.json"))
        save_file({k: np.ascontiguousarray(v) for k, v in store.items()}, os.path.join(tmp, "model.safetensors"))
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Cached the dequantized GGUF at %s for faster start-ups.", target)
    except OSError as e:
        logger.warning("Could not cache the dequantized GGUF (%s); start-up stays slower.", e)

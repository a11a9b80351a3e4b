"""RoPE tables for the JAX model: the torch models' own cos/sin cache, as numpy arrays.

The frequencies (default, linear, dynamic NTK, llama3, yarn, a GGUF file's
``rope_freq_factors``) are computed once, in the core's ``get_rope``, so both platforms
use the very same numbers; this is a start-up computation on the host. The model gathers
rows of the ``cos`` / ``sin`` tables [max_position, rotary_dim // 2].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class RopeTables(NamedTuple):
    cos: np.ndarray  # [max_position, rotary_dim // 2] float32, attention scaling applied
    sin: np.ndarray
    rotary_dim: int


def rope_tables(config: Any, head_dim: int, max_position: int | None = None) -> RopeTables:
    """cos/sin tables for every position below ``max_position`` (at least the model's context).

    Raises ValueError for a RoPE scaling type that is not supported.
    """
    from piston.model_executor.layers.rotary_embedding import get_rope

    model_max = int(getattr(config, "max_position_embeddings", 0) or 2048)
    rope = get_rope(config, head_dim, max(max_position or 0, model_max))
    cos, sin = rope.cos_sin_cache.numpy().reshape(rope.cos_sin_cache.shape[0], 2, -1).transpose(1, 0, 2)
    return RopeTables(np.ascontiguousarray(cos), np.ascontiguousarray(sin), rope.rotary_dim)

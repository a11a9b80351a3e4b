"""The paged KV cache of every layer in one array, and the scatter that fills it.

Layout ``[num_layers, 2 (k, v), num_kv_heads, num_blocks, block_size, head_dim]``: one
page of one head is a contiguous ``[block_size, head_dim]`` tile, the unit the Pallas
kernel copies from HBM. With a hybrid KV cache layout (piston.step.kv_cache_layout) the
first axis holds the layout's ``num_cache_layers`` tensors, each shared by one layer of
every group. The model writes a step's k/v before attention reads the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kv_cache_shape(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int) -> tuple[int, ...]:
    return (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim)


def write_kv(kv_cache: jax.Array, layer: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> jax.Array:
    """Store k, v [T, kv_heads, D] of ``layer`` at ``slot_mapping`` [T]; out-of-range slots
    (the runner's padding) are dropped."""
    block_size = kv_cache.shape[4]
    pages, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv = jnp.stack((k, v), axis=1).astype(kv_cache.dtype)  # [T, 2, kv_heads, D]
    return kv_cache.at[layer, :, :, pages, offsets].set(kv, mode="drop")

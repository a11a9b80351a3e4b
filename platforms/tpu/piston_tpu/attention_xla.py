"""Ragged paged attention in plain JAX: the fast path on JAX's CPU backend.

Same inputs and result as the Pallas kernel (attention_pallas), without Pallas: each
token gathers its own sequence's pages, a chunk of keys at a time, and folds them into
an online softmax. Work is tokens x context, with no padding to the longest query, and
the chunk loop runs only as far as the step's longest context. XLA fuses it well on a
CPU; on a TPU the kernel, which reads each page once per query block, is faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from piston_tpu.attention_metadata import AttentionMetadata

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Gathered keys per chunk x tokens stays under this many key rows, to bound the working set.
_MAX_GATHERED_ROWS = 1 << 15
# Every token scans to the step's longest context rounded up to a chunk: small chunks waste
# less (SmolLM2 on a CPU: a 512-token prefill 4.3 s with 512-key chunks, 1.4 s with 64).
_MAX_KEYS_PER_CHUNK = 64


def pages_per_chunk(num_tokens: int, block_size: int, pages_per_seq: int) -> int:
    """Pages each token reads per loop step: a divisor of pages_per_seq (a power of two)."""
    keys = max(block_size, min(_MAX_KEYS_PER_CHUNK, _MAX_GATHERED_ROWS // max(num_tokens, 1)))
    pages = max(1, keys // block_size)
    while pages_per_seq % pages:
        pages -= 1
    return pages


def ragged_paged_attention_xla(q: jax.Array, kv_cache: jax.Array, layer: jax.Array,
                               md: AttentionMetadata, *, sm_scale: float, window=0,
                               precision=lax.Precision.HIGHEST) -> jax.Array:
    """Causal attention of q [T, H, D] over the paged cache of ``layer``; returns [T, H, D].

    With a sliding ``window`` W > 0 (an int or a traced int32), the token at position p
    attends to positions p - W + 1 .. p only, and chunks wholly before every token's window
    are not read. Padding tokens (position -1) attend to nothing and return zeros.
    """
    t, h, d = q.shape
    kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[4]
    group = h // kv_heads
    pages_per_seq = md.page_indices.shape[1]
    step_pages = pages_per_chunk(t, block_size, pages_per_seq)
    step_keys = step_pages * block_size
    token_pages = md.page_indices[md.token_seqs]  # [T, pages_per_seq]
    positions = md.token_positions
    qf = q.astype(jnp.float32).reshape(t, kv_heads, group, d) * sm_scale
    num_steps = jnp.max(positions) // step_keys + 1  # 0 when every token is padding
    window = jnp.asarray(window, jnp.int32)
    earliest = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max)) - window + 1
    first_step = jnp.where(window > 0, jnp.clip(earliest, 0, None) // step_keys, 0)

    def chunk(j, carry):
        m, denom, acc = carry
        pages = lax.dynamic_slice_in_dim(token_pages, j * step_pages, step_pages, axis=1)
        k = kv_cache[layer, 0, :, pages].astype(jnp.float32)  # [T, pages, kv_heads, block, D]
        v = kv_cache[layer, 1, :, pages].astype(jnp.float32)
        k = k.transpose(0, 2, 1, 3, 4).reshape(t, kv_heads, step_keys, d)
        v = v.transpose(0, 2, 1, 3, 4).reshape(t, kv_heads, step_keys, d)
        s = jnp.einsum("tkgd,tkcd->tkgc", qf, k, precision=precision)
        key_pos = j * step_keys + jnp.arange(step_keys)
        mask = (key_pos[None, :] <= positions[:, None]) & (
            (window <= 0) | (key_pos[None, :] > positions[:, None] - window))
        mask = mask[:, None, None, :]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        denom = alpha * denom + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("tkgc,tkcd->tkgd", p, v, precision=precision)
        return m_new, denom, acc

    init = (jnp.full((t, kv_heads, group), MASK_VALUE, jnp.float32),
            jnp.zeros((t, kv_heads, group), jnp.float32),
            jnp.zeros((t, kv_heads, group, d), jnp.float32))
    _, denom, acc = lax.fori_loop(jnp.minimum(first_step, num_steps), num_steps, chunk, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(t, h, d).astype(q.dtype)

"""Ragged paged attention as a Pallas TPU kernel: Piston's own.

One kernel serves mixed prefill, chunked prefill and decode: the flattened tokens of a
step are cut into query blocks of ``block_q`` tokens, and the grid is (kv head, query
block). A grid step finds the sequences its block overlaps (a block may hold the tail of
one sequence and the heads of the next), and for each one walks the sequence's pages in
KV blocks of ``pages_per_block`` pages, copied from HBM to VMEM with async DMAs that are
double-buffered (block b+1 is in flight while block b is computed). The query rows of a
block are its tokens times the ``group`` query heads sharing the kv head, so a KV block is
read once for the whole group, and scores are one [rows, keys] matmul.
Online softmax runs in float32 in loop carries; the output is written once per grid step.

On a TPU it is compiled by Mosaic; elsewhere ``interpret=True`` runs the same kernel
through Pallas' interpreter (slow: use it for tests and tiny models). The code avoids the
idioms the interpreter mishandles: no ref bitcasts, no masked stores, and DMA buffers are
read with ``[...]`` before any reshape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from piston_tpu.attention_metadata import AttentionMetadata

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK_Q = 32
DEFAULT_KEYS_PER_BLOCK = 128


def pages_per_kv_block(block_size: int, keys_per_block: int = DEFAULT_KEYS_PER_BLOCK) -> int:
    """Pages the kernel copies per KV block; the runner pads page tables to a multiple."""
    return max(1, keys_per_block // block_size)


def _kernel(layer_ref, kv_lens_ref, page_indices_ref, cu_q_lens_ref, num_seqs_ref, window_ref,  # scalar prefetch
            q_ref, kv_hbm,  # inputs: q block [rows, D] in VMEM; the whole cache in HBM
            o_ref,  # output block [rows, D]
            k_buf, v_buf, sems,  # scratch: [2, pages, block_size, D] x2, DMA semaphores [2, 2]
            *, block_q: int, group: int, pages_per_block: int, pages_per_seq: int, sm_scale: float,
            precision):
    head = pl.program_id(0)
    q_start = pl.program_id(1) * block_q
    q_end = q_start + block_q
    rows, head_dim = q_ref.shape
    keys = pages_per_block * k_buf.shape[2]
    layer = layer_ref[0]
    num_seqs = num_seqs_ref[0]
    window = window_ref[0]  # sliding window, 0: the whole context

    def copies(seq, kv_block, slot):
        descriptors = []
        first = seq * pages_per_seq + kv_block * pages_per_block
        for i in range(pages_per_block):
            page = page_indices_ref[first + i]
            descriptors.append(pltpu.make_async_copy(kv_hbm.at[layer, 0, head, page], k_buf.at[slot, i],
                                                     sems.at[0, slot]))
            descriptors.append(pltpu.make_async_copy(kv_hbm.at[layer, 1, head, page], v_buf.at[slot, i],
                                                     sems.at[1, slot]))
        return descriptors

    q = q_ref[...].astype(jnp.float32) * sm_scale
    row_token = q_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group

    def attend_sequence(carry):
        seq, m, denom, acc = carry
        seq_start, seq_end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        first_pos = kv_lens_ref[seq] - (seq_end - seq_start)  # position of the sequence's first query
        last_pos = first_pos + jnp.minimum(seq_end, q_end) - 1 - seq_start
        num_blocks = last_pos // keys + 1  # only blocks some query of this q block can see
        # With a window, blocks wholly before the window of this q block's earliest query are skipped.
        earliest = first_pos + jnp.maximum(seq_start, q_start) - seq_start - window + 1
        first_block = jnp.where(window > 0, jnp.maximum(earliest, 0) // keys, 0)
        row_pos = first_pos + row_token - seq_start
        row_mine = (row_token >= seq_start) & (row_token < seq_end)
        for c in copies(seq, first_block, first_block % 2):
            c.start()

        def attend_block(b, carry):
            m, denom, acc = carry
            slot = b % 2

            @pl.when(b + 1 < num_blocks)
            def _prefetch_next():
                for c in copies(seq, b + 1, 1 - slot):
                    c.start()

            for c in copies(seq, b, slot):
                c.wait()
            k = k_buf[slot].reshape(keys, head_dim).astype(jnp.float32)
            v = v_buf[slot].reshape(keys, head_dim).astype(jnp.float32)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)
            key_pos = b * keys + lax.broadcasted_iota(jnp.int32, (1, keys), 1)
            mask = row_mine & (key_pos <= row_pos) & ((window <= 0) | (key_pos > row_pos - window))
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m - m_new)
            denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
            return m_new, denom, alpha * acc + pv

        m, denom, acc = lax.fori_loop(first_block, num_blocks, attend_block, (m, denom, acc))
        return seq + 1, m, denom, acc

    def overlaps(carry):
        seq = carry[0]
        return (seq < num_seqs) & (cu_q_lens_ref[seq] < q_end)

    # The first sequence whose queries reach into this block.
    first_seq = lax.while_loop(lambda s: (s < num_seqs) & (cu_q_lens_ref[s + 1] <= q_start),
                               lambda s: s + 1, jnp.int32(0))
    init = (first_seq, jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    _, _, denom, acc = lax.while_loop(overlaps, attend_sequence, init)
    o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def ragged_paged_attention_pallas(q: jax.Array, kv_cache: jax.Array, layer: jax.Array,
                                  md: AttentionMetadata, *, sm_scale: float, window=0, interpret: bool = False,
                                  block_q: int = DEFAULT_BLOCK_Q,
                                  keys_per_block: int = DEFAULT_KEYS_PER_BLOCK,
                                  precision=lax.Precision.HIGHEST) -> jax.Array:
    """Causal attention of q [T, H, D] over ``layer`` of the paged cache; returns [T, H, D].
    With a sliding ``window`` W > 0 (an int or a traced int32), each token attends to its
    last W positions only, and KV blocks before them are not copied.

    ``md.page_indices`` must have a multiple of ``pages_per_kv_block(block_size)`` columns.
    Tokens past ``md.cu_q_lens[num_seqs]`` (padding) return zeros.
    """
    t, h, d = q.shape
    _, _, kv_heads, _, block_size, _ = kv_cache.shape
    group = h // kv_heads
    block_q = min(block_q, t)
    if t % block_q:
        raise ValueError(f"{t} tokens are not a multiple of the query block ({block_q}); pad to a bucket.")
    pages_per_block = pages_per_kv_block(block_size, keys_per_block)
    num_seqs_max, pages_per_seq = md.page_indices.shape
    if pages_per_seq % pages_per_block:
        raise ValueError(f"page tables of {pages_per_seq} pages are not a multiple of the kernel's "
                         f"{pages_per_block}-page KV block.")
    # [T, H, D] -> [kv_heads, T * group, D]: a query block's rows are its tokens x the group.
    q_rows = q.reshape(t, kv_heads, group, d).transpose(1, 0, 2, 3).reshape(kv_heads, t * group, d)
    rows = block_q * group
    block = pl.BlockSpec((None, rows, d), lambda hd, qb, *_: (hd, qb, 0))
    kernel = functools.partial(_kernel, block_q=block_q, group=group, pages_per_block=pages_per_block,
                               pages_per_seq=pages_per_seq, sm_scale=sm_scale, precision=precision)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            in_specs=[block, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=block,
            grid=(kv_heads, t // block_q),
            scratch_shapes=[pltpu.VMEM((2, pages_per_block, block_size, d), kv_cache.dtype),
                            pltpu.VMEM((2, pages_per_block, block_size, d), kv_cache.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))],
        ),
        out_shape=jax.ShapeDtypeStruct((kv_heads, t * group, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="piston_ragged_paged_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), md.kv_lens, md.page_indices.reshape(-1), md.cu_q_lens,
      md.num_seqs, jnp.reshape(window, (1,)).astype(jnp.int32), q_rows, kv_cache)
    return out.reshape(kv_heads, t, group, d).transpose(1, 0, 2, 3).reshape(t, h, d)

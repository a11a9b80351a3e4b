"""The TPU platform's ragged paged attention: the Pallas kernel (interpret mode) and the
plain-JAX path against a direct numpy reference, on random paged caches.

Each batch mixes the three kinds of rows one step can hold: decode (one query token),
a fresh prefill (queries = context) and a chunked prefill (queries continue a context),
with sequences straddling query blocks and KV blocks, and padding tokens after them.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from piston_tpu.attention_metadata import AttentionMetadata  # noqa: E402
from piston_tpu.attention_pallas import pages_per_kv_block, ragged_paged_attention_pallas  # noqa: E402
from piston_tpu.attention_xla import ragged_paged_attention_xla  # noqa: E402
from piston_tpu.kv_cache import write_kv  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 96
MAX_SEQS = 8
PAGES_PER_SEQ = 16  # a multiple of the kernel's 8-page KV block (128 keys)


def _reference(q, cache, layer, seqs, page_table, scale, window=0):
    """Per sequence: gather its context, causal softmax attention (over the last ``window``
    positions only, when given), GQA by head groups."""
    t, h, d = q.shape
    kv_heads = cache.shape[2]
    group = h // kv_heads
    out = np.zeros((t, h, d), np.float64)
    start = 0
    for s, (q_len, kv_len) in enumerate(seqs):
        pages = page_table[s, :-(-kv_len // BLOCK_SIZE)]
        k = cache[layer, 0][:, pages].reshape(kv_heads, -1, d)[:, :kv_len].astype(np.float64)
        v = cache[layer, 1][:, pages].reshape(kv_heads, -1, d)[:, :kv_len].astype(np.float64)
        for i in range(q_len):
            pos = kv_len - q_len + i
            lo = max(0, pos - window + 1) if window else 0
            for head in range(h):
                kh = head // group
                scores = k[kh, lo:pos + 1] @ q[start + i, head].astype(np.float64) * scale
                p = np.exp(scores - scores.max())
                out[start + i, head] = (p / p.sum()) @ v[kh, lo:pos + 1]
        start += q_len
    return out


def _batch(rng, seqs, num_tokens, kv_heads, group, head_dim, num_layers=2):
    """Random q, a random cache with random page tables, and the step's metadata."""
    h = kv_heads * group
    cache = rng.standard_normal((num_layers, 2, kv_heads, NUM_BLOCKS, BLOCK_SIZE, head_dim)).astype(np.float32)
    q = rng.standard_normal((num_tokens, h, head_dim)).astype(np.float32)
    page_table = np.zeros((MAX_SEQS, PAGES_PER_SEQ), np.int32)
    free = rng.permutation(NUM_BLOCKS)
    positions = np.full(num_tokens, -1, np.int32)
    token_seqs = np.zeros(num_tokens, np.int32)
    kv_lens = np.zeros(MAX_SEQS, np.int32)
    cu = np.zeros(MAX_SEQS + 1, np.int32)
    for s, (q_len, kv_len) in enumerate(seqs):
        n = -(-kv_len // BLOCK_SIZE)
        page_table[s, :n], free = free[:n], free[n:]
        kv_lens[s] = kv_len
        cu[s + 1] = cu[s] + q_len
        positions[cu[s]:cu[s + 1]] = np.arange(kv_len - q_len, kv_len)
        token_seqs[cu[s]:cu[s + 1]] = s
    cu[len(seqs) + 1:] = cu[len(seqs)]
    md = AttentionMetadata(
        slot_mapping=jnp.full(num_tokens, NUM_BLOCKS * BLOCK_SIZE, jnp.int32),
        token_positions=jnp.asarray(positions), token_seqs=jnp.asarray(token_seqs),
        kv_lens=jnp.asarray(kv_lens), cu_q_lens=jnp.asarray(cu), page_indices=jnp.asarray(page_table),
        num_seqs=jnp.asarray([len(seqs)], jnp.int32))
    return q, cache, page_table, md


# (query tokens, context length) per sequence.
MIXED = [(1, 37), (50, 50), (1, 1), (23, 140), (1, 129), (9, 9)]


@pytest.mark.parametrize("kv_heads, group, head_dim", [(2, 2, 16), (3, 3, 64), (1, 4, 32)])
def test_pallas_kernel_matches_reference_on_mixed_batch(kv_heads, group, head_dim):
    rng = np.random.default_rng(0)
    q, cache, table, md = _batch(rng, MIXED, 128, kv_heads, group, head_dim)
    scale = head_dim ** -0.5
    out = ragged_paged_attention_pallas(jnp.asarray(q), jnp.asarray(cache), jnp.asarray(1), md,
                                        sm_scale=scale, interpret=True)
    expected = _reference(q, cache, 1, MIXED, table, scale)
    np.testing.assert_allclose(np.asarray(out)[:85], expected[:85], atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(out)[85:] == 0), "padding tokens must come back as zeros"


def test_xla_path_matches_reference_on_mixed_batch():
    rng = np.random.default_rng(1)
    q, cache, table, md = _batch(rng, MIXED, 128, 2, 3, 32)
    out = ragged_paged_attention_xla(jnp.asarray(q), jnp.asarray(cache), jnp.asarray(0), md, sm_scale=0.2)
    expected = _reference(q, cache, 0, MIXED, table, 0.2)
    np.testing.assert_allclose(np.asarray(out)[:85], expected[:85], atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(out)[85:] == 0)


@pytest.mark.parametrize("seqs", [
    [(1, 200)] * 7,  # decode only: one query block holds every sequence
    [(64, 64)],  # one prefill spanning query blocks exactly
    [(40, 250), (24, 24)],  # a chunk continuing a long context, then a fresh prompt
], ids=["decode", "prefill", "chunked"])
def test_xla_path_matches_pallas_kernel(seqs):
    rng = np.random.default_rng(2)
    q, cache, _, md = _batch(rng, seqs, 64, 2, 2, 16)
    q, cache = jnp.asarray(q), jnp.asarray(cache)
    kernel = ragged_paged_attention_pallas(q, cache, jnp.asarray(0), md, sm_scale=0.25, interpret=True)
    xla = ragged_paged_attention_xla(q, cache, jnp.asarray(0), md, sm_scale=0.25)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(kernel), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 20, 130])
def test_sliding_window_matches_reference_and_skips_pages_before_it(window):
    """Both paths mask each token to its last ``window`` positions; pages wholly before every
    row's window (which a KV manager may have freed) point at a garbage page and must not
    matter."""
    rng = np.random.default_rng(4)
    seqs = [(1, 37), (50, 50), (1, 250), (23, 140), (1, 129), (9, 9)]
    q, cache, table, md = _batch(rng, seqs, 128, 2, 2, 16)
    garbage = int(np.setdiff1d(np.arange(NUM_BLOCKS), table[:len(seqs)].ravel())[0])
    cache[:, :, :, garbage] = 1e4
    for s, (q_len, kv_len) in enumerate(seqs):
        first_pos = kv_len - q_len
        table[s, :max(0, first_pos - window + 1) // BLOCK_SIZE] = garbage
    md = md._replace(page_indices=jnp.asarray(table))
    expected = _reference(q, cache, 0, seqs, table, 0.25, window)
    n = sum(q_len for q_len, _ in seqs)
    q, cache = jnp.asarray(q), jnp.asarray(cache)
    for out in (ragged_paged_attention_pallas(q, cache, jnp.asarray(0), md, sm_scale=0.25, window=window,
                                              interpret=True),
                ragged_paged_attention_xla(q, cache, jnp.asarray(0), md, sm_scale=0.25, window=jnp.asarray(window))):
        np.testing.assert_allclose(np.asarray(out)[:n], expected[:n], atol=2e-5, rtol=1e-5)
        assert np.all(np.asarray(out)[n:] == 0)


def test_kernel_rejects_page_tables_not_multiple_of_its_kv_block():
    rng = np.random.default_rng(3)
    q, cache, _, md = _batch(rng, [(4, 4)], 16, 1, 1, 16)
    md = md._replace(page_indices=md.page_indices[:, :pages_per_kv_block(BLOCK_SIZE) - 1])
    with pytest.raises(ValueError, match="multiple"):
        ragged_paged_attention_pallas(jnp.asarray(q), jnp.asarray(cache), jnp.asarray(0), md, sm_scale=1.0,
                                      interpret=True)


def test_write_kv_fills_slots_and_drops_padding():
    cache = jnp.zeros((2, 2, 2, 4, BLOCK_SIZE, 8), jnp.float32)
    k = jnp.arange(3 * 2 * 8, dtype=jnp.float32).reshape(3, 2, 8)
    v = -k
    slots = jnp.asarray([BLOCK_SIZE * 2 + 5, 7, 4 * BLOCK_SIZE], jnp.int32)  # the last one is padding
    out = np.asarray(write_kv(cache, jnp.asarray(1), k, v, slots))
    np.testing.assert_array_equal(out[1, 0, :, 2, 5], np.asarray(k[0]))
    np.testing.assert_array_equal(out[1, 1, :, 0, 7], np.asarray(v[1]))
    assert np.count_nonzero(out[0]) == 0
    assert np.count_nonzero(out) == 2 * 2 * 2 * 8 - np.count_nonzero(np.asarray(k[:2]) == 0) * 2

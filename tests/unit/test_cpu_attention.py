"""The CPU paged-attention backend against a plain dense reference on random data."""

import math

import numpy as np
import pytest
import torch

from piston.attention.metadata import CommonAttentionMetadata
from piston_cpu import kernels
from piston_cpu.attention import CpuAttention, takes_flash

BACKENDS = ["sdpa", pytest.param("kernel", marks=pytest.mark.skipif(
    kernels.unavailable_reason() is not None, reason=f"CPU kernels: {kernels.unavailable_reason()}"))]


class Layer:
    def __init__(self, num_heads, num_kv_heads, head_dim, sliding_window=None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.sliding_window = sliding_window


def reference(q, k_all, v_all, context_len, layer):
    """Dense causal attention of the last q rows over the whole sequence (the last
    ``layer.sliding_window`` keys of each row only, with a window)."""
    qlen, seq = q.shape[0], k_all.shape[0]
    group = layer.num_heads // layer.num_kv_heads
    k = k_all.repeat_interleave(group, dim=1)
    v = v_all.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * layer.scale
    pos_q = torch.arange(context_len, context_len + qlen)[:, None]
    keys = torch.arange(seq)[None, :]
    scores = scores.masked_fill(keys > pos_q, float("-inf"))
    if layer.sliding_window is not None:
        scores = scores.masked_fill(keys <= pos_q - layer.sliding_window, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,window", [
    (4, 4, 32, 16, None), (8, 2, 64, 16, None), (6, 1, 128, 32, None), (9, 3, 64, 48, None),
    (4, 1, 256, 16, 20), (8, 2, 64, 16, 7), (6, 1, 128, 32, 1)])
def test_mixed_batch_matches_dense_reference(num_heads, num_kv_heads, head_dim, block_size, window, backend):
    # (context already in the cache, new query tokens): decode, fresh prefill, chunked prefill.
    # The kernel takes prompt rows (runs of 16 or more) in tiles of up to 32 rows against 64
    # keys at a time: (100, 150) spans five tiles, the last a partial one, over up to four key
    # tiles; (16, 40) a whole tile and one of 8 rows; (0, 23) one; (3, 7) and (9, 8) go row by
    # row, and decode rows of more than 128 keys (attend_group's tiles) over several tiles.
    # On layers without a window, torch's flash attention takes (0, 600) and (1300, 120): long
    # enough chunks (attention.takes_flash), the second merged with its cached prefix's part.
    long_prompts = [(0, 600), (1300, 120)]
    seqs = [(37, 1), (0, 23), (50, 1), (16, 40), (5, 1), (0, 1), (100, 150), (3, 7), (9, 8)] + [
        (c, 1) for c in range(3, 140, 9)] + [(300, 1)] + long_prompts
    layer = Layer(num_heads, num_kv_heads, head_dim, window)
    md = _check_against_reference(layer, block_size, seqs, backend)
    if backend == "kernel" and takes_flash(600, 0):
        assert [(p.prefix, p.end - p.start) for p in md.kernel_rows.long_prompts] == long_prompts
        assert not takes_flash(150, 100) and not takes_flash(40, 5000)  # the C++ tiles keep these


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window", [
    (9, 3, 64, None), (6, 1, 128, None), (8, 2, 64, 700), (4, 4, 32, None)])
@pytest.mark.parametrize("seqs", [[(1500, 1)], [(700, 1), (2100, 1)], [(40, 1), (3000, 1)], [(0, 40)]])
def test_small_batch_long_context_decode(num_heads, num_kv_heads, head_dim, window, seqs, backend):
    # Too few (row, KV head) tasks for the threads: the kernel cuts each context into parts
    # (up to the thread count times 16 tasks, at least 256 keys each), some of them empty for
    # the shorter row, and merges them by log-sum-exp; head_dim 32 splits the query heads.
    # A step of prompt rows only (all in tiles) has no such rows at all.
    _check_against_reference(Layer(num_heads, num_kv_heads, head_dim, window), 16, seqs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window",
                         [(9, 3, 64, None), (4, 1, 128, 20), (4, 4, 32, None)])
def test_16bit_cache_attends_to_kv_as_stored(num_heads, num_kv_heads, head_dim, window, cache_dtype, backend):
    # --kv-cache-dtype float16|bfloat16 under a float32 model: the step's K/V are rounded to
    # the cache's dtype as torch rounds them, and every row (decode, prompt tile, row by
    # row, the long prompts of torch's flash attention, split decode contexts) attends, in
    # float32, to the K/V as stored: the float32 reference over the rounded K/V.
    seqs = [(37, 1), (0, 23), (16, 40), (5, 1), (100, 150), (3, 7), (300, 1), (0, 600), (1300, 120)]
    _check_against_reference(Layer(num_heads, num_kv_heads, head_dim, window), 16, seqs, backend, cache_dtype)
    _check_against_reference(Layer(num_heads, num_kv_heads, head_dim, window), 16, [(2100, 1)], backend, cache_dtype)


def _check_against_reference(layer, block_size, seqs, backend, cache_dtype=torch.float32):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    num_blocks = 512
    num_heads, num_kv_heads, head_dim, window = (layer.num_heads, layer.num_kv_heads, layer.head_dim,
                                                 layer.sliding_window)
    impl = CpuAttention(kernels.load() if backend == "kernel" else None)
    assert impl.name == ("cpu_paged_kernel" if backend == "kernel" else "cpu_sdpa")
    cache = torch.zeros(impl.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim), dtype=cache_dtype)
    free = list(rng.permutation(num_blocks))  # block tables deliberately out of order
    tables, full_k, full_v = [], [], []
    for ctx, new in seqs:
        nblk = -(-(ctx + new) // block_size)
        tables.append([int(free.pop()) for _ in range(nblk)])
        full_k.append(torch.randn(ctx + new, num_kv_heads, head_dim))
        full_v.append(torch.randn(ctx + new, num_kv_heads, head_dim))
    stored_k = [k.to(cache_dtype).float() for k in full_k]  # what attention reads back
    stored_v = [v.to(cache_dtype).float() for v in full_v]
    # Fill each sequence's earlier context into the cache as a previous step would have.
    for (ctx, _), table, k, v in zip(seqs, tables, full_k, full_v):
        for pos in range(ctx):
            blk, off = table[pos // block_size], pos % block_size
            cache[0, blk, off], cache[1, blk, off] = k[pos], v[pos]
    qs, ks, vs, slots = [], [], [], []
    for (ctx, new), table, k, v in zip(seqs, tables, full_k, full_v):
        qs.append(torch.randn(new, num_heads, head_dim))
        ks.append(k[ctx:]), vs.append(v[ctx:])
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + new)]
    if window is not None:  # blocks wholly before every row's window may be freed: point them elsewhere
        garbage = int(free.pop())
        cache[:, garbage] = 1e4
        for (ctx, _), table in zip(seqs, tables):
            for j in range(max(0, ctx + 1 - window) // block_size):
                table[j] = garbage
    qlens = np.array([n for _, n in seqs])
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    seq_lens = np.array([c + n for c, n in seqs], dtype=np.int32)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    common = CommonAttentionMetadata(
        num_reqs=len(seqs), num_actual_tokens=int(qsl[-1]), max_query_len=int(qlens.max()),
        max_seq_len=int(seq_lens.max()), query_start_loc_np=qsl, seq_lens_np=seq_lens,
        query_start_loc=torch.from_numpy(qsl), seq_lens=torch.from_numpy(seq_lens),
        block_table=table, slot_mapping=torch.tensor(slots, dtype=torch.int64), block_size=block_size)
    md = impl.build_metadata(common)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    out = impl.forward(layer, q.flatten(1), k.flatten(1), v.flatten(1), cache, md)
    out = out.view(-1, num_heads, head_dim)
    for i, (ctx, _) in enumerate(seqs):
        expected = reference(qs[i], stored_k[i], stored_v[i], ctx, layer)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], expected, atol=1e-5, rtol=1e-5)
    # The step's own k/v landed in the paged cache at the slot mapping.
    flat_k = cache[0].view(-1, num_kv_heads, head_dim)
    flat_v = cache[1].view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[torch.tensor(slots)], k.to(cache_dtype))
    assert torch.equal(flat_v[torch.tensor(slots)], v.to(cache_dtype))
    return md


def test_decode_rows_split_into_groups_only_when_it_saves_work():
    from piston_cpu.attention import split_decode_rows

    assert split_decode_rows(np.full(64, 16)) == [64]  # equal lengths: one call
    assert split_decode_rows(np.array([1, 1])) == [2]  # too few rows to split
    spread = np.sort(np.linspace(2, 22, 64).astype(np.int64))
    ends = split_decode_rows(spread)
    assert len(ends) == 4 and ends[-1] == 64

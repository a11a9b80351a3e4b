"""Plain-torch references and random paged batches for the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_lens: list[int]
    context_lens: list[int]
    block_size: int
    scale: float

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def make_paged_batch(query_lens, context_lens, *, block_size, num_kv_heads, queries_per_kv, head_dim,
                     dtype, device, seed=0, shared_prefix_blocks=0) -> PagedBatch:
    """Random queries and a random paged cache. Every sequence gets its own blocks, drawn in
    shuffled order from a pool with spare blocks; the first ``shared_prefix_blocks`` blocks of
    every sequence are the same blocks (a shared system prompt)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    seq_lens = [c + q for q, c in zip(query_lens, context_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    own = [n - shared_prefix_blocks for n in blocks_per_seq]
    assert min(own) >= 0
    num_blocks = shared_prefix_blocks + sum(own) + 7
    pool = rng.permutation(num_blocks)
    shared, rest = pool[:shared_prefix_blocks], pool[shared_prefix_blocks:]
    max_blocks = max(blocks_per_seq) + 2
    table = np.full((len(seq_lens), max_blocks), -1, dtype=np.int32)  # -1: never read
    start = 0
    for i, n in enumerate(own):
        table[i, :shared_prefix_blocks] = shared
        table[i, shared_prefix_blocks:shared_prefix_blocks + n] = rest[start:start + n]
        start += n
    num_heads = num_kv_heads * queries_per_kv
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(query_lens)
    return PagedBatch(q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype),
                      torch.from_numpy(table).to(device), torch.from_numpy(qsl).to(device),
                      torch.tensor(seq_lens, dtype=torch.int32, device=device), list(query_lens),
                      list(context_lens), block_size, head_dim ** -0.5)


def gather_keys(cache: torch.Tensor, table_row: torch.Tensor, start: int, end: int, block_size: int):
    pos = torch.arange(start, end)
    blocks = table_row.cpu()[pos // block_size].long()
    return cache.cpu()[blocks, pos % block_size].double()  # [n, kv_heads, head_dim]


def reference_attention(b: PagedBatch, kv_start: int = 0, causal: bool = True, window: int | None = None):
    """Float64 attention of every query over its sequence's keys ``[kv_start, seq_len)`` (its
    last ``window`` positions only, with a window):
    ``(out [num_tokens, num_heads, head_dim], lse [num_heads, num_tokens])``."""
    q_all = b.q.cpu().double()
    num_heads = q_all.shape[1]
    outs, lses = [], []
    qsl = b.query_start_loc.cpu().tolist()
    for i in range(b.num_seqs):
        q = q_all[qsl[i]:qsl[i + 1]]
        seq_len = b.context_lens[i] + b.query_lens[i]
        k = gather_keys(b.k_cache, b.block_table[i], kv_start, seq_len, b.block_size)
        v = gather_keys(b.v_cache, b.block_table[i], kv_start, seq_len, b.block_size)
        rep = num_heads // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) * b.scale
        if causal:
            q_pos = b.context_lens[i] + torch.arange(q.shape[0])[:, None]
            k_pos = torch.arange(kv_start, seq_len)[None, :]
            s = s.masked_fill(k_pos > q_pos, float("-inf"))
            if window is not None:
                s = s.masked_fill(k_pos <= q_pos - window, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [heads, q]
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, v))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def kernel_dtypes() -> list[torch.dtype]:
    """bfloat16 and float16 on a GPU; float32 and float16 in the CPU interpreter (which
    computes bfloat16 wrongly)."""
    return [torch.bfloat16, torch.float16] if torch.cuda.is_available() else [torch.float32, torch.float16]


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]

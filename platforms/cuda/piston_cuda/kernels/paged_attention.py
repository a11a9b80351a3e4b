"""One paged-attention kernel for a whole mixed batch, with a split-KV (flash-decoding) path.

The step's query tokens are flattened (``query_start_loc`` marks each sequence). A program
owns one *query block* of a sequence for one KV head: ``BLOCK_Q`` consecutive tokens times
the ``QUERIES_PER_KV`` query heads that share the KV head (GQA), ``BLOCK_M`` rows in all,
so each key/value tile loaded from the cache feeds every head of the group. The program
walks the sequence's keys in tiles of ``TILE_N`` positions, looking up each position's
block in the block table, so any cache block size works and block tables may be in any
order. An online softmax (in base 2) accumulates in float32.

One kernel serves prefill, chunked prefill and decode: the query of a sequence with
``seq_len`` keys and ``query_len`` queries sits at positions ``seq_len - query_len ..``
and sees keys up to its own position (``CAUSAL``). ``kv_start`` skips the first keys of
every sequence (cascade attention's suffix pass); ``CAUSAL=False`` with one "sequence"
holding every query is cascade attention's shared-prefix pass. A sliding ``window`` W > 0
limits each query to its last W positions; tiles before the window of a query block's
first row are not read.

Split-KV: with few programs (small batch) and long contexts, ``NUM_SPLITS`` programs share
one query block's keys, each writing a float32 partial output and its log-sum-exp; a
second kernel reduces them. Query blocks are found by binary search over
``query_start_loc // BLOCK_Q + seq``, a strictly increasing upper bound of each sequence's
first block index, so the grid needs no host-built map.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Split-KV pays off only when each split still streams a good run of keys.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks include ``q_block`` (the last one starting at or before it)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "kv_start", "window"])
def _paged_attention_kernel(
        out_ptr, lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
        block_table_ptr, query_start_loc_ptr, seq_lens_ptr,
        scale_log2, num_seqs, kv_start, window,
        stride_q_t, stride_q_h,
        stride_c_blk, stride_c_slot, stride_c_h,
        stride_bt,
        stride_o_s, stride_o_t, stride_o_h,
        stride_l_s, stride_l_h, stride_l_t,
        QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        TILE_N: tl.constexpr, CAUSAL: tl.constexpr, SLIDING: tl.constexpr, NUM_SPLITS: tl.constexpr,
        STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, TILE_N)
    q_tok = local_block * BLOCK_Q + offs_m // QUERIES_PER_KV  # index within the sequence's queries
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    row_ok = (offs_m // QUERIES_PER_KV < BLOCK_Q) & (q_tok < q_len)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + q_tok).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    q_pos = context_len + q_tok  # absolute position of each row's query
    if CAUSAL:
        kv_end = tl.minimum(seq_len, context_len + tl.minimum(local_block * BLOCK_Q + BLOCK_Q, q_len))
    else:
        kv_end = seq_len
    kv_lo = kv_start
    if SLIDING:  # keys before the window of this block's first query are never needed
        kv_lo = tl.maximum(kv_lo, context_len + local_block * BLOCK_Q - window + 1)
    tile_lo = kv_lo // TILE_N
    tile_hi = tl.cdiv(kv_end, TILE_N)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, tile_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        pos = tile * TILE_N + offs_n
        pos_ok = (pos >= kv_lo) & (pos < kv_end)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        slot = blk * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_h
        k = tl.load(k_cache_ptr + slot[None, :] + offs_d[:, None],
                    mask=pos_ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)  # a 16-bit cache widens
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        allowed = row_ok[:, None] & pos_ok[None, :]
        if CAUSAL:
            allowed = allowed & (pos[None, :] <= q_pos[:, None])
        if SLIDING:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; shift them by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] + offs_d[None, :],
                    mask=pos_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + split * stride_o_s + token[:, None] * stride_o_t + head[:, None] * stride_o_h \
        + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
        tl.store(lse_ptr + split * stride_l_s + head * stride_l_h + token * stride_l_t, lse, mask=row_ok)


@triton.jit
def _reduce_splits_kernel(out_ptr, lse_ptr, part_ptr, part_lse_ptr,
                          stride_o_t, stride_o_h, stride_l_h, stride_l_t,
                          stride_p_s, stride_p_t, stride_p_h, stride_pl_s, stride_pl_h, stride_pl_t,
                          NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                          STORE_LSE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + offs_s * stride_pl_s + head * stride_pl_h + token * stride_pl_t)
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # splits that saw no key weigh 0
    total = tl.sum(w, 0)
    parts = tl.load(part_ptr + offs_s[:, None] * stride_p_s + token * stride_p_t + head * stride_p_h
                    + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_ok)
    if STORE_LSE:
        tl.store(lse_ptr + head * stride_l_h + token * stride_l_t,
                 tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total)))


def tile_config(max_query_len: int, queries_per_kv: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_Q, TILE_N)`` for a launch: 16 rows when every sequence's queries fit
    (decode), 64 otherwise so long prompts reuse each key tile across more queries."""
    if queries_per_kv > 16:
        block_m = triton.next_power_of_2(queries_per_kv)
    elif max_query_len * queries_per_kv <= 16:
        block_m = 16
    else:
        block_m = max(64, triton.next_power_of_2(queries_per_kv))
    return block_m, block_m // queries_per_kv, 32


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                  num_sms: int) -> int:
    """How many programs share each query block's keys: more than one only for decode-only
    batches whose programs (one per sequence and KV head) leave SMs idle, on contexts long
    enough that every split still reads ``MIN_KEYS_PER_SPLIT`` keys. A power of two."""
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs >= num_sms or max_seq_len < 2 * MIN_KEYS_PER_SPLIT:
        return 1
    want = min(MAX_SPLITS, -(-num_sms // programs), max_seq_len // MIN_KEYS_PER_SPLIT)
    return 1 << (want.bit_length() - 1) if want > 1 else 1


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *,
                    num_seqs: int, max_query_len: int, scale: float, causal: bool = True,
                    kv_start: int = 0, lse: torch.Tensor | None = None, num_splits: int = 1,
                    window: int | None = None) -> None:
    """Attention of ``q`` ``[num_tokens, num_heads, head_dim]`` over the paged cache into ``out``.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``, in q's dtype
    or another (``--kv-cache-dtype``): K and V are converted to q's dtype as they are read.
    ``block_table`` ``[num_seqs, >= max blocks]`` int32, ``query_start_loc`` ``[num_seqs + 1]``
    and ``seq_lens`` ``[num_seqs]`` int32 describe the sequences (see the module docstring).
    ``out`` may be float32 (cascade partials). ``lse`` ``[num_heads, num_tokens]`` float32, if
    given, receives each row's natural log-sum-exp (-inf for a row with no key).
    Keys before ``kv_start`` are skipped. ``num_splits`` > 1 selects the split-KV path.
    ``window``: a causal sliding window (each query sees its last ``window`` positions).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_tokens == 0:
        return
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged_attention: q and the caches need a contiguous last dimension, "
                         "and the key and value caches the same strides.")
    qpk = num_heads // num_kv_heads
    block_m, block_q, tile_n = tile_config(max_query_len, qpk)
    grid_q = num_tokens // block_q + num_seqs
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    # float32 models must match their reference exactly: no TF32 in the dots.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # A 64 x 256 float32 accumulator would spill with 4 warps.
    num_warps = 8 if block_m * head_dim_pad >= 64 * 256 else 4
    common = dict(QUERIES_PER_KV=qpk, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
                  BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
                  CAUSAL=causal, SLIDING=bool(window), DOT_PRECISION=precision, num_warps=num_warps)
    if window and not causal:
        raise ValueError("paged_attention: a sliding window needs causal attention.")
    args = (q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale * LOG2E, num_seqs, kv_start,
            window or 0,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_table.stride(0))
    if num_splits <= 1:
        lse_arg = lse if lse is not None else out  # never written when STORE_LSE is off
        lse_strides = (0, lse.stride(0), lse.stride(1)) if lse is not None else (0, 0, 0)
        _paged_attention_kernel[(grid_q, num_kv_heads, 1)](
            out, lse_arg, *args, 0, out.stride(0), out.stride(1), *lse_strides,
            NUM_SPLITS=1, STORE_LSE=lse is not None, **common)
        return
    part = torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_splits, num_heads, num_tokens), dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(grid_q, num_kv_heads, num_splits)](
        part, part_lse, *args, *part.stride()[:3], *part_lse.stride(),
        NUM_SPLITS=num_splits, STORE_LSE=True, **common)
    lse_arg = lse if lse is not None else part_lse
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    _reduce_splits_kernel[(num_tokens, num_heads)](
        out, lse_arg, part, part_lse, out.stride(0), out.stride(1), *lse_strides,
        *part.stride()[:3], *part_lse.stride(),
        NUM_SPLITS=num_splits, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, STORE_LSE=lse is not None)

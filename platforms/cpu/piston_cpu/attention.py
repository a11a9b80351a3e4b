"""Paged attention on the CPU.

With Piston's CPU kernels (``piston_cpu.kernels``), every query row of a step (decode,
fresh prompt or continuing chunk) goes to one C++ call that reads its sequence's K/V
from the paged cache in place, after writing the step's own K/V there. Long prompt chunks
(at least ``FLASH_MIN_PAIRS`` query-key pairs) are the exception on layers without a
sliding window: torch's CPU flash attention, whose blocks run on torch's GEMM at the CPU's
full vector width, takes them (``long_prompt_attention``), and the C++ call only writes
their K/V.
Without them (a dtype other than float32, or no compiler), decode rows are batched into
a few SDPA calls over their gathered, padded contexts: rows are sorted by length and
split into up to four groups when that saves more padded work than the extra calls cost.
Prefill and chunked-prefill rows run one SDPA call each: a fresh prompt attends to its
own k/v with a causal mask; a chunk that continues a sequence gathers its context from
the paged cache and, without a sliding window, goes through ``long_prompt_attention`` (no
mask to build or apply), else uses an offset causal mask.

The cache may hold a narrower dtype than the model's (``--kv-cache-dtype``): the C++ kernel
reads float16 and bfloat16 in place; the torch paths convert what they gather. Either way
every row attends to K/V as the cache holds them, its own step's rows included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from piston.attention.backend import AttentionImpl
from piston.attention.layer import window_mask
from piston.attention.metadata import CommonAttentionMetadata


@dataclass
class PrefillSeq:
    start: int  # first query row in the step
    end: int
    seq_len: int
    fresh: bool  # no earlier context: attend to this step's own k/v
    block_ids: torch.Tensor | None  # blocks holding the context (when not fresh)
    window_masks: dict[int, torch.Tensor | None] = field(default_factory=dict)  # sliding window -> mask

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The [query_len, seq_len] bool mask (True = attend) for a layer with sliding
        ``window`` (None: the causal mask; a fresh prompt needs none then), built on first
        use, once per step and window."""
        if window is None or window >= self.seq_len:
            if self.fresh:
                return None
            window = self.seq_len  # the causal mask, cached under the full length
        if window not in self.window_masks:
            qlen = self.end - self.start
            self.window_masks[window] = window_mask(torch.arange(self.seq_len - qlen, self.seq_len),
                                                    self.seq_len, window)
        return self.window_masks[window]


@dataclass
class DecodeGroup:
    token_idx: torch.Tensor  # [rows] rows of the step's tokens
    block_ids: torch.Tensor  # [rows * max_blocks] int64, row-major
    mask: torch.Tensor  # [rows, 1, 1, max_blocks * block_size] bool, True = attend
    lens: torch.Tensor  # [rows] int64: each row's context length
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # sliding window -> mask

    def mask_for(self, window: int | None) -> torch.Tensor:
        """The mask for a layer with sliding ``window``: also False before each row's last
        ``window`` tokens. Built once per step and window."""
        if window is None:
            return self.mask
        if window not in self.window_masks:
            keys = torch.arange(self.mask.shape[-1])[None, :]
            self.window_masks[window] = self.mask & (keys >= self.lens[:, None] - window)[:, None, None, :]
        return self.window_masks[window]


@dataclass
class LongPrompt:
    """A prompt chunk for torch's flash attention: query rows [start, end) of the step at
    positions [prefix, prefix + end - start) of their sequence."""
    start: int
    end: int
    prefix: int  # tokens of the sequence before the chunk, read from the cache
    block_ids: torch.Tensor | None  # int64: the blocks holding them (None when prefix is 0)


@dataclass
class KernelRows:
    """Every query row of the step, for the C++ kernel."""
    seq_idx: torch.Tensor  # [T] int32: the row's sequence (its row of block_table)
    ctx_lens: torch.Tensor  # [T] int32: tokens the row attends to (its position + 1)
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, contiguous
    long_prompts: list[LongPrompt] = field(default_factory=list)
    # ctx_lens with 0 on the long prompts' rows: the kernel writes their K/V and skips them.
    short_ctx_lens: torch.Tensor | None = None


# torch's CPU flash attention op, which also returns each row's log-sum-exp (None when this
# torch lacks it: then every row goes to the C++ kernel).
try:
    _flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):
    _flash_attention = None

# A prompt chunk of q rows after p cached tokens attends to about q * (p + q / 2) query-key
# pairs. From about this many (and at least FLASH_MIN_ROWS rows) torch's flash attention
# beats the C++ tiles, measured on a 2-core AVX-512 Xeon with SmolLM2's heads (9 query, 3 KV,
# 64 wide): a fresh 2,048-token prompt 33 ms vs 51 ms, 856 rows after 6,144 tokens 76 ms vs
# 134 ms, 96 rows after 2,000 tokens 3.9 ms vs 5.3 ms; 512 fresh rows 4.7 ms vs 3.6 ms, and
# 16 rows after 8,000 tokens 11 ms vs 4.4 ms. The C++ call's per-row work is what torch's
# is compared with, so this holds per chunk, whatever else the step carries.
FLASH_MIN_PAIRS = 150_000
FLASH_MIN_ROWS = 64


def takes_flash(query_len: int, prefix: int) -> bool:
    """Whether a prompt chunk goes to torch's flash attention rather than the C++ kernel."""
    return (_flash_attention is not None and query_len >= FLASH_MIN_ROWS
            and query_len * (prefix + query_len / 2) >= FLASH_MIN_PAIRS)


def as_stored(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the cache's dtype and back: the values attention reads once written."""
    return x if cache.dtype == x.dtype else x.to(cache.dtype).to(x.dtype)


def long_prompt_attention(q, k, v, key_cache, value_cache, p: LongPrompt, num_heads: int,
                          scale: float) -> torch.Tensor:
    """Causal attention of one prompt chunk ([rows, H*D] q, its own [rows, KVH*D] k and v),
    as [rows, H*D], from two flash-attention calls merged by their log-sum-exps: the chunk
    over itself (causal, K/V repeated per query head) and, after a cached prefix, over the
    prefix (no mask; the G query heads of a KV head ride as extra query rows, so the
    prefix's K/V are gathered from the paged cache once and never repeated)."""
    rows = p.end - p.start
    kvh, d = key_cache.shape[2], key_cache.shape[3]
    g = num_heads // kvh
    qh = q[p.start:p.end].view(rows, num_heads, d)
    ks = as_stored(k[p.start:p.end], key_cache).view(rows, kvh, d)
    vs = as_stored(v[p.start:p.end], value_cache).view(rows, kvh, d)
    if g > 1:
        ks, vs = ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1)
    own, own_lse = _flash_attention(qh.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                    vs.transpose(0, 1)[None], 0.0, True, scale=scale)[:2]
    own, own_lse = own[0], own_lse[0]  # [H, rows, D], [H, rows]
    if p.prefix:
        kp = key_cache[p.block_ids].view(-1, kvh, d)[:p.prefix].transpose(0, 1)[None].to(q.dtype)
        vp = value_cache[p.block_ids].view(-1, kvh, d)[:p.prefix].transpose(0, 1)[None].to(q.dtype)
        qf = qh.view(rows, kvh, g, d).permute(1, 2, 0, 3).reshape(1, kvh, g * rows, d)
        pre, pre_lse = _flash_attention(qf, kp, vp, 0.0, False, scale=scale)[:2]
        pre, pre_lse = pre.reshape(num_heads, rows, d), pre_lse.reshape(num_heads, rows)
        top = torch.maximum(own_lse, pre_lse)
        w_own, w_pre = (own_lse - top).exp_(), (pre_lse - top).exp_()
        total = w_own + w_pre
        own = own * (w_own / total)[..., None] + pre * (w_pre / total)[..., None]
    return own.transpose(0, 1).reshape(rows, num_heads * d)


@dataclass
class CpuAttentionMetadata:
    slot_mapping: torch.Tensor
    num_actual_tokens: int
    decodes: list[DecodeGroup]
    prefills: list[PrefillSeq]
    kernel_rows: KernelRows | None = None


# One SDPA call costs about as much as this many padded (row, block) pairs of work.
_CALL_COST_ROW_BLOCKS = 32


def split_decode_rows(num_blocks_sorted: np.ndarray) -> list[int]:
    """End offsets of the groups that sorted decode rows are split into: equal-count
    groups (1, 2 or 4), whichever minimizes padded work plus per-call cost."""
    n = len(num_blocks_sorted)
    best_cost, best = None, [n]
    for k in (1, 2, 4):
        if k > 1 and n < 2 * k:
            break
        ends = [n * (i + 1) // k for i in range(k)]
        starts = [0] + ends[:-1]
        cost = sum(int(num_blocks_sorted[e - 1]) * (e - s) for s, e in zip(starts, ends))
        cost += k * _CALL_COST_ROW_BLOCKS
        if best_cost is None or cost < best_cost:
            best_cost, best = cost, ends
    return best


class CpuAttention(AttentionImpl):
    """``kernels``: the compiled ``piston_cpu.kernels`` module (float32 decode), or None."""

    def __init__(self, kernels=None) -> None:
        self.kernels = kernels
        self.name = "cpu_paged_kernel" if kernels is not None else "cpu_sdpa"

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        bs = common.block_size
        qsl = common.query_start_loc_np
        seq_lens = common.seq_lens_np
        query_lens = np.diff(qsl)
        if self.kernels is not None:
            n = int(qsl[-1])
            seq_idx = np.repeat(np.arange(len(query_lens), dtype=np.int32), query_lens)
            # Row j of a sequence with query length ql and length sl sits at position
            # sl - ql + j and attends to sl - ql + j + 1 tokens.
            ctx = np.arange(n, dtype=np.int32) - qsl[:-1][seq_idx] + (seq_lens - query_lens)[seq_idx] + 1
            rows = KernelRows(torch.from_numpy(seq_idx), torch.from_numpy(ctx.astype(np.int32)),
                              common.block_table.contiguous())
            for i in np.flatnonzero(query_lens >= FLASH_MIN_ROWS):
                start, end, prefix = int(qsl[i]), int(qsl[i + 1]), int(seq_lens[i] - query_lens[i])
                if takes_flash(end - start, prefix):
                    blocks = common.block_table[i, :-(-prefix // bs)].long() if prefix else None
                    rows.long_prompts.append(LongPrompt(start, end, prefix, blocks))
            if rows.long_prompts:
                short = ctx.astype(np.int32)
                for p in rows.long_prompts:
                    short[p.start:p.end] = 0
                rows.short_ctx_lens = torch.from_numpy(short)
            return CpuAttentionMetadata(common.slot_mapping, common.num_actual_tokens, [], [], rows)
        decode_rows = np.flatnonzero(query_lens == 1)
        decodes = []
        if len(decode_rows):
            lens = seq_lens[decode_rows]
            order = np.argsort(lens, kind="stable")
            rows_sorted, lens_sorted = decode_rows[order], lens[order].astype(np.int64)
            blocks_sorted = -(-lens_sorted // bs)
            start = 0
            for end in split_decode_rows(blocks_sorted):
                rows, group_lens = rows_sorted[start:end], lens_sorted[start:end]
                max_blocks = int(blocks_sorted[end - 1])
                table = common.block_table[torch.from_numpy(rows), :max_blocks].long().flatten()
                mask = torch.arange(max_blocks * bs)[None, :] < torch.from_numpy(group_lens)[:, None]
                decodes.append(DecodeGroup(torch.from_numpy(qsl[rows].astype(np.int64)), table,
                                           mask[:, None, None, :], torch.from_numpy(group_lens)))
                start = end
        prefills = []
        for row in np.flatnonzero(query_lens > 1):
            start, end, seq_len = int(qsl[row]), int(qsl[row + 1]), int(seq_lens[row])
            qlen = end - start
            if seq_len == qlen:
                prefills.append(PrefillSeq(start, end, seq_len, True, None))
                continue
            nblocks = -(-seq_len // bs)
            prefills.append(PrefillSeq(start, end, seq_len, False, common.block_table[row, :nblocks].long()))
        return CpuAttentionMetadata(common.slot_mapping, common.num_actual_tokens, decodes, prefills)

    def forward(self, layer, q, k, v, kv_cache, md: CpuAttentionMetadata, output=None) -> torch.Tensor:
        n = md.num_actual_tokens
        if md.kernel_rows is not None:  # writes k/v to the cache, then attends
            rows = md.kernel_rows
            flash = rows.long_prompts if not layer.sliding_window else []
            out = self.kernels.paged_attention(q[:n], k, v, kv_cache[0], kv_cache[1], md.slot_mapping,
                                               rows.block_table, rows.seq_idx,
                                               rows.short_ctx_lens if flash else rows.ctx_lens,
                                               layer.num_heads, layer.scale, layer.sliding_window or 0)
            for p in flash:
                out[p.start:p.end] = long_prompt_attention(q, k, v, kv_cache[0], kv_cache[1], p,
                                                           layer.num_heads, layer.scale)
            return out
        h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = q[:n].view(n, h, d)
        k = k[:n].view(n, kvh, d)
        v = v[:n].view(n, kvh, d)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        nb, bs = key_cache.shape[0], key_cache.shape[1]
        key_cache.view(nb * bs, kvh, d).index_copy_(0, md.slot_mapping[:n], k.to(key_cache.dtype))
        value_cache.view(nb * bs, kvh, d).index_copy_(0, md.slot_mapping[:n], v.to(value_cache.dtype))

        out = torch.empty_like(q)
        for group in md.decodes:
            out[group.token_idx] = self._decode(layer, q[group.token_idx], key_cache,
                                                value_cache, group)
        for p in md.prefills:
            out[p.start:p.end] = self._prefill(layer, q, k, v, key_cache, value_cache, p)
        return out.view(n, h * d)

    def _decode(self, layer, q, key_cache, value_cache, group: DecodeGroup) -> torch.Tensor:
        b, h, d = q.shape
        kvh = layer.num_kv_heads
        # index_select over whole blocks copies rows of block_size*kvh*d floats: about
        # 2.5x faster than advanced indexing on the 4-D cache.
        nb = key_cache.shape[0]
        keys = torch.index_select(key_cache.view(nb, -1), 0, group.block_ids)
        values = torch.index_select(value_cache.view(nb, -1), 0, group.block_ids)
        keys = keys.view(b, -1, kvh, d).transpose(1, 2).to(q.dtype)
        values = values.view(b, -1, kvh, d).transpose(1, 2).to(q.dtype)
        # Grouped heads ride as extra query rows, so K/V are never repeated.
        qg = q.view(b, kvh, h // kvh, d)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=group.mask_for(layer.sliding_window),
                                             scale=layer.scale)
        return out.reshape(b, h, d)

    def _prefill(self, layer, q, k, v, key_cache, value_cache, p: PrefillSeq) -> torch.Tensor:
        kvh, d = layer.num_kv_heads, layer.head_dim
        qi = q[p.start:p.end].transpose(0, 1)
        gqa = layer.num_heads != kvh
        window = layer.sliding_window
        if not p.fresh and (window is None or window >= p.seq_len) and _flash_attention is not None:
            chunk = LongPrompt(p.start, p.end, p.seq_len - (p.end - p.start), p.block_ids)  # no mask needed
            return long_prompt_attention(q.flatten(1), k.flatten(1), v.flatten(1), key_cache, value_cache, chunk,
                                         layer.num_heads, layer.scale).view(p.end - p.start, layer.num_heads, d)
        mask = p.mask_for(window)
        if p.fresh:
            ki = as_stored(k[p.start:p.end], key_cache).transpose(0, 1)
            vi = as_stored(v[p.start:p.end], value_cache).transpose(0, 1)
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=mask is None, attn_mask=mask,
                                                 scale=layer.scale, enable_gqa=gqa)
        else:
            ki = key_cache[p.block_ids].view(-1, kvh, d)[:p.seq_len].transpose(0, 1).to(q.dtype)
            vi = value_cache[p.block_ids].view(-1, kvh, d)[:p.seq_len].transpose(0, 1).to(q.dtype)
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=layer.scale,
                                                 enable_gqa=gqa)
        return out.transpose(0, 1)

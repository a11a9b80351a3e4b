"""Paged attention on the CPU with torch's scaled_dot_product_attention.

Decode rows (one query token) of a step are batched into one SDPA call over their
gathered, padded contexts. Prefill and chunked-prefill rows run one SDPA call each:
a fresh prompt attends to its own k/v with a causal mask; a chunk that continues a
sequence gathers its context from the paged cache and uses an offset causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from piston.attention.backend import AttentionImpl
from piston.attention.metadata import CommonAttentionMetadata


@dataclass
class PrefillSeq:
    start: int  # first query row in the step
    end: int
    seq_len: int
    fresh: bool  # no earlier context: attend to this step's own k/v
    block_ids: torch.Tensor | None  # blocks holding the context (when not fresh)
    mask: torch.Tensor | None  # [query_len, seq_len] bool, True = attend (when not fresh)


@dataclass
class CpuAttentionMetadata:
    slot_mapping: torch.Tensor
    num_actual_tokens: int
    # Decode rows, batched.
    decode_token_idx: torch.Tensor | None  # [num_decodes] rows of the step's tokens
    decode_block_ids: torch.Tensor | None  # [num_decodes * max_blocks] int64, row-major
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size]
    prefills: list[PrefillSeq]


class CpuAttention(AttentionImpl):
    name = "cpu_sdpa"

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        bs = common.block_size
        qsl = common.query_start_loc_np
        seq_lens = common.seq_lens_np
        query_lens = np.diff(qsl)
        decode_rows = np.flatnonzero(query_lens == 1)
        decode_idx = table = mask = None
        if len(decode_rows):
            max_blocks = int(-(-int(seq_lens[decode_rows].max()) // bs))
            rows_t = torch.from_numpy(decode_rows)
            decode_idx = torch.from_numpy(qsl[decode_rows].astype(np.int64))
            table = common.block_table[rows_t, :max_blocks].long().flatten()
            lens = torch.from_numpy(seq_lens[decode_rows].astype(np.int64))
            mask = (torch.arange(max_blocks * bs)[None, :] < lens[:, None])[:, None, None, :]
        prefills = []
        for row in np.flatnonzero(query_lens > 1):
            start, end, seq_len = int(qsl[row]), int(qsl[row + 1]), int(seq_lens[row])
            qlen = end - start
            if seq_len == qlen:
                prefills.append(PrefillSeq(start, end, seq_len, True, None, None))
                continue
            nblocks = -(-seq_len // bs)
            q_pos = torch.arange(seq_len - qlen, seq_len)[:, None]
            causal = torch.arange(seq_len)[None, :] <= q_pos
            prefills.append(PrefillSeq(start, end, seq_len, False,
                                       common.block_table[row, :nblocks].long(), causal))
        return CpuAttentionMetadata(common.slot_mapping, common.num_actual_tokens,
                                    decode_idx, table, mask, prefills)

    def forward(self, layer, q, k, v, kv_cache, md: CpuAttentionMetadata) -> torch.Tensor:
        n = md.num_actual_tokens
        h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = q[:n].view(n, h, d)
        k = k[:n].view(n, kvh, d)
        v = v[:n].view(n, kvh, d)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        nb, bs = key_cache.shape[0], key_cache.shape[1]
        key_cache.view(nb * bs, kvh, d).index_copy_(0, md.slot_mapping[:n], k)
        value_cache.view(nb * bs, kvh, d).index_copy_(0, md.slot_mapping[:n], v)

        out = torch.empty_like(q)
        if md.decode_token_idx is not None:
            out[md.decode_token_idx] = self._decode(layer, q[md.decode_token_idx], key_cache,
                                                    value_cache, md)
        for p in md.prefills:
            out[p.start:p.end] = self._prefill(layer, q, k, v, key_cache, value_cache, p)
        return out.view(n, h * d)

    def _decode(self, layer, q, key_cache, value_cache, md) -> torch.Tensor:
        b, h, d = q.shape
        kvh = layer.num_kv_heads
        group = h // kvh
        # index_select over whole blocks copies rows of block_size*kvh*d floats: about
        # 2.5x faster than advanced indexing on the 4-D cache.
        nb = key_cache.shape[0]
        keys = torch.index_select(key_cache.view(nb, -1), 0, md.decode_block_ids)
        values = torch.index_select(value_cache.view(nb, -1), 0, md.decode_block_ids)
        keys = keys.view(b, -1, kvh, d).transpose(1, 2)
        values = values.view(b, -1, kvh, d).transpose(1, 2)
        # Grouped heads ride as extra query rows, so K/V are never repeated.
        qg = q.view(b, kvh, group, d)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=md.decode_mask,
                                             scale=layer.scale)
        return out.reshape(b, h, d)

    def _prefill(self, layer, q, k, v, key_cache, value_cache, p: PrefillSeq) -> torch.Tensor:
        kvh, d = layer.num_kv_heads, layer.head_dim
        qi = q[p.start:p.end].transpose(0, 1)
        gqa = layer.num_heads != kvh
        if p.fresh:
            ki = k[p.start:p.end].transpose(0, 1)
            vi = v[p.start:p.end].transpose(0, 1)
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=layer.scale,
                                                 enable_gqa=gqa)
        else:
            ki = key_cache[p.block_ids].view(-1, kvh, d)[:p.seq_len].transpose(0, 1)
            vi = value_cache[p.block_ids].view(-1, kvh, d)[:p.seq_len].transpose(0, 1)
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=p.mask, scale=layer.scale,
                                                 enable_gqa=gqa)
        return out.transpose(0, 1)

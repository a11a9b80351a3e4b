"""The ``triton`` attention backend: Piston's own kernels (the default without flash-attn).

Per layer and step: one kernel writes the step's K/V at the slot mapping; one paged
attention kernel covers the whole mixed batch (split-KV for long decodes at small batch);
with cascade attention, a non-causal pass over the shared prefix and a causal pass over
each suffix are merged with their log-sum-exps. Partials are float32 so cascade changes
the result only by float32 rounding. A sliding-window layer never cascades (the shared
prefix pass would see keys outside its window): its kernel skips the keys before the window.
"""

from __future__ import annotations

import torch

from piston_cuda.attention.metadata import CudaAttentionBackend, CudaAttentionMetadata
from piston_cuda.kernels.merge_attn_states import merge_attn_states
from piston_cuda.kernels.paged_attention import num_kv_splits, paged_attention


class TritonAttention(CudaAttentionBackend):
    name = "triton"

    def num_splits(self, num_reqs: int, max_query_len: int, max_seq_len: int) -> int:
        return num_kv_splits(num_reqs, self.num_kv_heads, max_query_len, max_seq_len, self.num_sms)

    def forward(self, layer, q, k, v, kv_cache, md: CudaAttentionMetadata, output=None) -> torch.Tensor:
        n, q, key_cache, value_cache = self.write_step_kv(layer, q, k, v, kv_cache, md)
        h, d = layer.num_heads, layer.head_dim
        if output is not None and output.dtype == q.dtype and output.is_contiguous():
            out = output[:n].view(n, h, d)  # the kernels write the caller's buffer: no copy after
        else:
            out = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
        c = md.cascade
        window = getattr(layer, "sliding_window", None)
        if c is None or window is not None:
            paged_attention(q, key_cache, value_cache, out, md.block_table, md.query_start_loc, md.seq_lens,
                            num_seqs=md.num_reqs, max_query_len=md.max_query_len, scale=layer.scale,
                            num_splits=md.num_splits, window=window)
            return out.view(n, h * d)
        prefix_out = torch.empty((n, h, d), dtype=torch.float32, device=q.device)
        suffix_out = torch.empty_like(prefix_out)
        prefix_lse = torch.empty((h, n), dtype=torch.float32, device=q.device)
        suffix_lse = torch.empty_like(prefix_lse)
        paged_attention(q, key_cache, value_cache, prefix_out, c.prefix_block_table, c.prefix_query_start_loc,
                        c.prefix_seq_lens, num_seqs=1, max_query_len=n, scale=layer.scale, causal=False,
                        lse=prefix_lse)
        paged_attention(q, key_cache, value_cache, suffix_out, md.block_table, md.query_start_loc, md.seq_lens,
                        num_seqs=md.num_reqs, max_query_len=md.max_query_len, scale=layer.scale,
                        kv_start=c.prefix_len, lse=suffix_lse)
        merge_attn_states(out, prefix_out, prefix_lse, suffix_out, suffix_lse)
        return out.view(n, h * d)

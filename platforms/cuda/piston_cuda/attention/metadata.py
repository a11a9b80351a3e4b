"""The CUDA backends' per-step attention metadata, and the base class that builds it.

``CudaAttentionBackend.build_metadata`` turns the runner's neutral metadata into what the
kernels take, once per step: it decides cascade attention (``cascade``) and the split-KV
factor, and stages the few extra host arrays through ``self.stage`` (the CUDA runner's
pinned staging area, so they ride on the step's one host-to-device copy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from piston.attention.backend import AttentionImpl
from piston.attention.metadata import CommonAttentionMetadata
from piston_cuda.attention.cascade import usable_prefix_len, use_cascade_attention

logger = logging.getLogger(__name__.replace("piston_cuda", "piston.cuda", 1))

Stage = Callable[..., Sequence[torch.Tensor]]


@dataclass
class CascadeMetadata:
    """The shared-prefix pass (every query as one sequence over ``prefix_len`` keys) and
    the suffix pass (each request over its keys from ``prefix_len`` on)."""

    prefix_len: int
    prefix_blocks: int
    prefix_query_start_loc: torch.Tensor  # [2] int32: 0, num_tokens
    prefix_seq_lens: torch.Tensor  # [1] int32: prefix_len
    prefix_cu_seqlens_k: torch.Tensor  # [2] int32: 0, prefix_len
    prefix_block_table: torch.Tensor  # [1, prefix_blocks] int32
    suffix_seq_lens: torch.Tensor  # [num_reqs] int32: seq_lens - prefix_len
    suffix_cu_seqlens_k: torch.Tensor  # [num_reqs + 1] int32
    suffix_block_table: torch.Tensor  # [num_reqs, max_blocks - prefix_blocks] int32
    max_suffix_len: int


@dataclass
class CudaAttentionMetadata:
    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    cu_seqlens_k: torch.Tensor  # [num_reqs + 1] int32 (FlashAttention 2)
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64
    num_splits: int = 1  # split-KV factor of the Triton decode path
    cascade: CascadeMetadata | None = None


def _cumsum0(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x) + 1, dtype=np.int32)
    np.cumsum(x, out=out[1:])
    return out


class CudaAttentionBackend(AttentionImpl):
    """Shared by the Triton and FlashAttention backends: cache layout and metadata.

    ``num_heads``/``num_kv_heads`` are this rank's; ``num_sms`` sizes the split-KV path
    (0: never split). ``use_cascade=False`` turns cascade attention off (tests compare).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, num_sms: int = 0,
                 use_cascade: bool = True) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.queries_per_kv = num_heads // num_kv_heads
        self.num_sms = num_sms
        self.use_cascade = use_cascade
        self.stage: Stage | None = None  # set by the CUDA runner; None: plain copies

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        # [key/value, block, slot, head, dim]: kv_cache[0] is FlashAttention's paged layout.
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def block_q(self, max_query_len: int) -> int:
        """Queries per query block of the attention kernel for this batch shape."""
        from piston_cuda.kernels.paged_attention import tile_config

        return tile_config(max_query_len, self.queries_per_kv)[1]

    def num_splits(self, num_reqs: int, max_query_len: int, max_seq_len: int) -> int:
        return 1

    @staticmethod
    def write_step_kv(layer, q, k, v, kv_cache, md: "CudaAttentionMetadata"):
        """Write the step's K/V into the paged cache at the slot mapping; returns
        ``(n, q as [n, heads, dim], key_cache, value_cache)`` for the attention pass."""
        from piston_cuda.kernels.kv_cache_write import write_kv_cache

        n = md.num_actual_tokens
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        write_kv_cache(k[:n], v[:n], key_cache, value_cache, md.slot_mapping[:n])
        return n, q[:n].view(n, layer.num_heads, layer.head_dim), key_cache, value_cache

    def _stage(self, device: torch.device, *arrays: np.ndarray) -> Sequence[torch.Tensor]:
        if self.stage is not None:
            return self.stage(*arrays)
        return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]

    def build_metadata(self, common: CommonAttentionMetadata) -> CudaAttentionMetadata:
        device = common.query_start_loc.device
        qsl, seq_lens = common.query_start_loc_np, common.seq_lens_np
        query_lens = np.diff(qsl)
        cascade = None
        prefix_len = 0
        if self.use_cascade and common.num_common_prefix_blocks > 0:
            prefix_len = usable_prefix_len(common.num_common_prefix_blocks, common.block_size,
                                           seq_lens - query_lens)
        if prefix_len and use_cascade_attention(prefix_len, query_lens, self.block_q(common.max_query_len),
                                                self.block_q(common.num_actual_tokens)):
            cascade = self._cascade_metadata(common, prefix_len, device)
        (cu_seqlens_k,) = self._stage(device, _cumsum0(seq_lens))
        num_splits = 1 if cascade else self.num_splits(common.num_reqs, common.max_query_len, common.max_seq_len)
        return CudaAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens, num_reqs=common.num_reqs,
            max_query_len=common.max_query_len, max_seq_len=common.max_seq_len,
            query_start_loc=common.query_start_loc, seq_lens=common.seq_lens, cu_seqlens_k=cu_seqlens_k,
            block_table=common.block_table, slot_mapping=common.slot_mapping,
            num_splits=num_splits, cascade=cascade)

    def _cascade_metadata(self, common: CommonAttentionMetadata, prefix_len: int,
                          device: torch.device) -> CascadeMetadata:
        prefix_blocks = prefix_len // common.block_size
        suffix_lens = (common.seq_lens_np - prefix_len).astype(np.int32)
        prefix_qsl, prefix_lens, prefix_cu_k, suffix_lens_t, suffix_cu_k = self._stage(
            device, np.array([0, common.num_actual_tokens], dtype=np.int32),
            np.array([prefix_len], dtype=np.int32), np.array([0, prefix_len], dtype=np.int32),
            suffix_lens, _cumsum0(suffix_lens))
        return CascadeMetadata(
            prefix_len=prefix_len, prefix_blocks=prefix_blocks, prefix_query_start_loc=prefix_qsl,
            prefix_seq_lens=prefix_lens, prefix_cu_seqlens_k=prefix_cu_k,
            prefix_block_table=common.block_table[:1, :prefix_blocks],
            suffix_seq_lens=suffix_lens_t, suffix_cu_seqlens_k=suffix_cu_k,
            suffix_block_table=common.block_table[:, prefix_blocks:],
            max_suffix_len=int(suffix_lens.max()))

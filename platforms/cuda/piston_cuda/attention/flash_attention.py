"""The ``flash_attn`` backend: FlashAttention 3 (``flash_attn_interface``) when it is
importable on a Hopper GPU, else FlashAttention 2 (``flash_attn``).

Neither package is a dependency: ``detect_flash_attn`` imports them lazily and reports
None when they are absent or broken, and the selector then falls back to Triton. K/V
are written into the paged cache by Piston's Triton kernel (FlashAttention's paged layout
is ``kv_cache[0]``/``kv_cache[1]`` as they are), and cascade partials are merged by its
merge kernel.

Calls follow the libraries' documented signatures:
- FA3 ``flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=, page_table=,
  cu_seqlens_q=, max_seqlen_q=, softmax_scale=, causal=, return_softmax_lse=)``
  with varlen queries ``[total_q, heads, dim]``;
- FA2 ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, softmax_scale=, causal=, block_table=, return_attn_probs=)`` (upstream),
  or with ``seqused_k=`` and ``return_softmax_lse=`` where the build has them (vLLM's fork).
Both return the log-sum-exp as ``[heads, total_q]``. A sliding window W goes in as
``window_size=(W - 1, 0)`` (both libraries' causal local attention), and such a layer
never cascades.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from piston_cuda.attention.metadata import CudaAttentionBackend, CudaAttentionMetadata

logger = logging.getLogger(__name__.replace("piston_cuda", "piston.cuda", 1))

# Upstream FlashAttention 2 pages its KV cache only in blocks of a multiple of 256 tokens.
FA2_UPSTREAM_PAGE_MULTIPLE = 256


@dataclass(frozen=True)
class FlashAttnLibrary:
    version: int  # 3 or 2
    fn: Callable[..., Any]  # flash_attn_with_kvcache (3) or flash_attn_varlen_func (2)
    has_seqused_k: bool = False
    has_return_softmax_lse: bool = False

    @property
    def label(self) -> str:
        return f"FlashAttention {self.version}"


def _has_param(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def detect_flash_attn(capability: tuple[int, int] | None) -> FlashAttnLibrary | None:
    """The installed FlashAttention this GPU can run, or None. Never raises.

    FA3 needs compute capability 9.x (Hopper); ``capability`` None skips that check.
    """
    if capability is None or capability[0] == 9:
        try:
            import flash_attn_interface

            return FlashAttnLibrary(3, flash_attn_interface.flash_attn_with_kvcache)
        except Exception:  # absent, or a build that does not load: fall through
            pass
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return FlashAttnLibrary(2, flash_attn_varlen_func, _has_param(flash_attn_varlen_func, "seqused_k"),
                            _has_param(flash_attn_varlen_func, "return_softmax_lse"))


def unsupported_reason(lib: FlashAttnLibrary, dtype: torch.dtype, block_size: int, head_dim: int) -> str | None:
    """Why ``lib`` cannot run this model and cache, or None when it can."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{lib.label} runs float16 and bfloat16 only (dtype is {str(dtype).removeprefix('torch.')})"
    if head_dim % 8 or head_dim > 256:
        return f"{lib.label} needs a head_dim that is a multiple of 8 up to 256 (got {head_dim})"
    if lib.version == 2 and not lib.has_seqused_k and block_size % FA2_UPSTREAM_PAGE_MULTIPLE:
        return (f"upstream {lib.label} pages the KV cache in blocks of a multiple of "
                f"{FA2_UPSTREAM_PAGE_MULTIPLE} tokens (block_size is {block_size})")
    return None


class FlashAttention(CudaAttentionBackend):
    name = "flash_attn"

    def __init__(self, lib: FlashAttnLibrary, num_heads: int, num_kv_heads: int, head_dim: int,
                 num_sms: int = 0, use_cascade: bool = True) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, num_sms, use_cascade)
        self.lib = lib

    def forward(self, layer, q, k, v, kv_cache, md: CudaAttentionMetadata, output=None) -> torch.Tensor:
        n, q, key_cache, value_cache = self.write_step_kv(layer, q, k, v, kv_cache, md)
        h, d = layer.num_heads, layer.head_dim
        c = md.cascade
        window = getattr(layer, "sliding_window", None)
        if c is None or window is not None:
            out, _ = self._attend(q, key_cache, value_cache, md.query_start_loc, md.max_query_len, md.seq_lens,
                                  md.cu_seqlens_k, md.max_seq_len, md.block_table, layer.scale, True, False,
                                  window)
            return out.reshape(n, h * d)
        from piston_cuda.kernels.merge_attn_states import merge_attn_states

        prefix_out, prefix_lse = self._attend(q, key_cache, value_cache, c.prefix_query_start_loc, n,
                                              c.prefix_seq_lens, c.prefix_cu_seqlens_k, c.prefix_len,
                                              c.prefix_block_table, layer.scale, False, True)
        suffix_out, suffix_lse = self._attend(q, key_cache, value_cache, md.query_start_loc, md.max_query_len,
                                              c.suffix_seq_lens, c.suffix_cu_seqlens_k, c.max_suffix_len,
                                              c.suffix_block_table, layer.scale, True, True)
        out = torch.empty_like(q)
        merge_attn_states(out, prefix_out, prefix_lse, suffix_out, suffix_lse)
        return out.view(n, h * d)

    def _attend(self, q, k_cache, v_cache, cu_seqlens_q, max_seqlen_q, seq_lens, cu_seqlens_k, max_seqlen_k,
                block_table, scale, causal, return_lse, window=None):
        """(out [total_q, heads, dim], lse [heads, total_q] or None)."""
        lib = self.lib
        local = {"window_size": (window - 1, 0)} if window is not None else {}
        if lib.version == 3:
            res = lib.fn(q, k_cache, v_cache, cache_seqlens=seq_lens, page_table=block_table,
                         cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, softmax_scale=scale,
                         causal=causal, return_softmax_lse=return_lse, **local)
        elif lib.has_seqused_k:
            lse_kw = {"return_softmax_lse": return_lse} if lib.has_return_softmax_lse else \
                {"return_attn_probs": return_lse}
            res = lib.fn(q=q, k=k_cache, v=v_cache, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                         seqused_k=seq_lens, max_seqlen_k=max_seqlen_k, softmax_scale=scale, causal=causal,
                         block_table=block_table, **lse_kw, **local)
        else:
            res = lib.fn(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale=scale, causal=causal, block_table=block_table,
                         return_attn_probs=return_lse, **local)
        if not return_lse:
            return (res[0] if isinstance(res, tuple) else res), None
        return res[0], res[1]

"""Write a step's keys and values into the paged KV cache at the slot mapping.

Slot ``s`` is row ``s % block_size`` of block ``s // block_size``. A negative slot marks a
padding token (a captured graph's spare rows) and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_k_t, stride_v_t, stride_c_blk, stride_c_slot,
                     BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    dst = (slot // BLOCK_SIZE) * stride_c_blk + (slot % BLOCK_SIZE) * stride_c_slot
    offs = tl.arange(0, ROW_PAD)
    ok = offs < ROW
    k = tl.load(k_ptr + token.to(tl.int64) * stride_k_t + offs, mask=ok)
    v = tl.load(v_ptr + token.to(tl.int64) * stride_v_t + offs, mask=ok)
    tl.store(k_cache_ptr + dst + offs, k.to(k_cache_ptr.dtype.element_ty), mask=ok)  # the cache's dtype
    tl.store(v_cache_ptr + dst + offs, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Copy ``k``/``v`` ``[num_tokens, num_kv_heads * head_dim]`` (rows may be strided, each row
    contiguous) into ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``,
    converted to the caches' dtype (round to nearest even)."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    row = num_kv_heads * head_dim
    k = k.reshape(k.shape[0], row) if k.dim() != 2 else k
    v = v.reshape(v.shape[0], row) if v.dim() != 2 else v
    if k.stride(1) != 1:
        k = k.contiguous()
    if v.stride(1) != 1:
        v = v.contiguous()
    if k_cache.stride(2) != head_dim or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("write_kv_cache: the cache's (slot, head, dim) rows must be contiguous and "
                         "the key and value caches must share strides.")
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
        k_cache.stride(0), k_cache.stride(1),
        BLOCK_SIZE=block_size, ROW=row, ROW_PAD=triton.next_power_of_2(row))

"""Merge two attention results over disjoint key sets with their log-sum-exps.

Cascade attention computes each query against the shared prefix and against its own
suffix separately; softmax over the union of the keys is the lse-weighted mean of the
two outputs: ``out = (e^a * o_a + e^b * o_b) / (e^a + e^b)``, ``lse = log(e^a + e^b)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_attn_states_kernel(out_ptr, lse_out_ptr, a_ptr, a_lse_ptr, b_ptr, b_lse_ptr,
                              stride_o_t, stride_o_h, stride_a_t, stride_a_h, stride_b_t, stride_b_h,
                              stride_al_h, stride_al_t, stride_bl_h, stride_bl_t,
                              stride_ol_h, stride_ol_t,
                              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, STORE_LSE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    a_lse = tl.load(a_lse_ptr + head * stride_al_h + token * stride_al_t)
    b_lse = tl.load(b_lse_ptr + head * stride_bl_h + token * stride_bl_t)
    # FlashAttention reports +inf for a row that saw no key; treat it as empty (-inf).
    a_lse = tl.where(a_lse == float("inf"), float("-inf"), a_lse)
    b_lse = tl.where(b_lse == float("inf"), float("-inf"), b_lse)
    m = tl.maximum(a_lse, b_lse)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(a_lse - m_safe)
    wb = tl.exp(b_lse - m_safe)
    total = wa + wb
    inv = 1.0 / tl.where(total == 0.0, 1.0, total)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    a = tl.load(a_ptr + token * stride_a_t + head * stride_a_h + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + token * stride_b_t + head * stride_b_h + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    out = a * (wa * inv) + b * (wb * inv)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_ok)
    if STORE_LSE:
        tl.store(lse_out_ptr + head * stride_ol_h + token * stride_ol_t,
                 tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total)))


def merge_attn_states(out: torch.Tensor, a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor,
                      b_lse: torch.Tensor, out_lse: torch.Tensor | None = None) -> None:
    """``out`` ``[num_tokens, num_heads, head_dim]`` = the merge of partial results ``a`` and ``b``
    (same shape, any float dtype) with log-sum-exps ``a_lse``/``b_lse`` ``[num_heads, num_tokens]``
    (any strides; natural log). ``out_lse``, if given, receives the merged log-sum-exp."""
    num_tokens, num_heads, head_dim = out.shape
    if num_tokens == 0:
        return
    for t in (out, a, b):
        if t.stride(2) != 1:
            raise ValueError("merge_attn_states: outputs need a contiguous head dimension.")
    lse_arg = out_lse if out_lse is not None else a_lse
    ol_strides = (out_lse.stride(0), out_lse.stride(1)) if out_lse is not None else (0, 0)
    _merge_attn_states_kernel[(num_tokens, num_heads)](
        out, lse_arg, a, a_lse, b, b_lse, out.stride(0), out.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), a_lse.stride(0), a_lse.stride(1), b_lse.stride(0), b_lse.stride(1),
        *ol_strides, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        STORE_LSE=out_lse is not None)

"""Mixture-of-experts: a layer's routed experts as two Triton grouped GEMMs (vLLM's fused_moe idea).

``moe_align`` sorts the step's (token, j) pairs (``pair = token * k + j``) by expert and pads
each expert's group to a multiple of ``BLOCK_M``, so that every block of ``BLOCK_M`` sorted
rows belongs to one expert (``block_experts``; -1 for the blocks past the last group). It runs
on the device with torch ops whose sizes follow from the shapes alone (the padded length is
bounded by ``T * k + min(E, T * k) * (BLOCK_M - 1)``): nothing is read back to the host, so
the whole layer can be captured in a CUDA graph.

Two kernels then run over (block of sorted rows x block of output columns):

* gate/up: ``a[pair] = silu(x[token] @ w13[e, :I].T) * (x[token] @ w13[e, I:].T)``: both halves
  accumulate side by side and the activation is applied before the store, so the [T*k, 2I]
  gate/up product never reaches memory;
* down: ``y[pair] = weight[pair] * (a[pair] @ w2[e].T)``, float32 ``[T*k, H]``; the k rows of a
  token are summed afterwards in float32.

Programs of padding blocks return at once. Precision: products accumulate in float32;
float16 / bfloat16 operands multiply on the tensor cores, float32 ones in IEEE float32 (no
TF32). ``a`` is stored in x's dtype, as torch's path has it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, a_ptr, pairs_ptr, block_experts_ptr, num_pairs, K, inter, top_k,
                    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_at,
                    HALF_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    pair = tl.load(pairs_ptr + rm)
    m_ok = pair < num_pairs
    n_ok = rn < inter
    token = (pair // top_k).to(tl.int64)
    x_rows = x_ptr + token[:, None] * stride_xt
    w_gate = w_ptr + expert.to(tl.int64) * stride_we + rn[None, :] * stride_wn
    w_up = w_gate + inter * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_gate + kk[:, None] * stride_wk, mask=w_ok, other=0.0)
        wu = tl.load(w_up + kk[:, None] * stride_wk, mask=w_ok, other=0.0)
        if HALF_DOT:
            gate += tl.dot(x, wg)
            up += tl.dot(x, wu)
        else:
            gate += tl.dot(x.to(tl.float32), wg.to(tl.float32), input_precision="ieee")
            up += tl.dot(x.to(tl.float32), wu.to(tl.float32), input_precision="ieee")
    act = gate / (1.0 + tl.exp(-gate)) * up
    out = a_ptr + pair.to(tl.int64)[:, None] * stride_at + rn[None, :]
    tl.store(out, act.to(a_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, y_ptr, pairs_ptr, block_experts_ptr, weights_ptr, num_pairs, K, N,
                 stride_at, stride_ak, stride_we, stride_wn, stride_wk, stride_yt,
                 HALF_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    pair = tl.load(pairs_ptr + rm)
    m_ok = pair < num_pairs
    n_ok = rn < N
    a_rows = a_ptr + pair.to(tl.int64)[:, None] * stride_at
    w_base = w_ptr + expert.to(tl.int64) * stride_we + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_rows + kk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HALF_DOT:
            acc += tl.dot(a, w)
        else:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    weight = tl.load(weights_ptr + pair, mask=m_ok, other=0.0).to(tl.float32)
    out = y_ptr + pair.to(tl.int64)[:, None] * stride_yt + rn[None, :]
    tl.store(out, acc * weight[:, None], mask=m_ok[:, None] & n_ok[None, :])


def _block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs int32 [P], block_experts int32 [P // block_m]) for ``topk_ids`` [T, k]:
    the pair indices ``t * k + j`` grouped by expert (in pair order within a group), each group
    padded with ``T * k`` to a multiple of ``block_m``, and the expert of each block (-1 past
    the last group). P depends on the shapes only; no device value is read on the host."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    device = flat.device
    capacity = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_ends = ((counts + block_m - 1) // block_m * block_m).cumsum(0)
    padded_starts = padded_ends - (counts + block_m - 1) // block_m * block_m
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[expert]
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_starts[expert] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, capacity, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, block_start, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_pairs, block_experts


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))``, ``e = topk_ids[t, j]``:
    [T, H] in x's dtype. The contract of piston.models.layers.fused_moe.fused_experts.

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights [T, k]
    (float32); topk_ids [T, k] (int64). Any strides; x, w13 and w2 of one dtype.
    """
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or w13.shape[2] != x.shape[1] \
            or w2.shape[2] * 2 != w13.shape[1] or w2.shape[0] != w13.shape[0] or w2.shape[1] != x.shape[1]:
        raise ValueError(f"fused_experts takes x [T, H], w13 [E, 2I, H] and w2 [E, H, I], got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}.")
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    num_pairs = num_tokens * top_k
    block_m = _block(num_pairs // num_experts, 16, 64)
    sorted_pairs, block_experts = moe_align(topk_ids, num_experts, block_m)
    num_blocks = block_experts.numel()
    half_dot = x.dtype in (torch.float16, torch.bfloat16) and w13.dtype == x.dtype and w2.dtype == x.dtype
    block_n = 64
    block_k = 64 if block_m <= 32 else 32
    a = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, w13, a, sorted_pairs, block_experts, num_pairs, hidden, inter, top_k,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), a.stride(0),
        HALF_DOT=half_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).float().contiguous()
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        a, w2, y, sorted_pairs, block_experts, weights, num_pairs, inter, hidden,
        a.stride(0), a.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        HALF_DOT=half_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


@torch.library.custom_op("piston_cuda::fused_moe", mutates_args=())
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """``fused_experts`` as an opaque op: torch.compile keeps it whole inside a compiled piece
    (it traces neither the Triton launches nor the alignment), and a CUDA graph captures it."""
    return fused_experts(x, w13, w2, topk_weights, topk_ids)


@fused_moe.register_fake
def _(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
      topk_ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w2.shape[1])

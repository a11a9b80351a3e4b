"""Batched multi-LoRA: ``y[t] += (x[t] @ A[s]) @ B[s]`` for the tokens of each adapter slot ``s``.

Punica / S-LoRA "SGMV" style, as vLLM's v1 LoRA kernels: the tokens that use an adapter are
listed in ``token_ids`` grouped by slot (``slot_ends`` the cumulative group ends), and one
launch serves every slot. Program axis 0 runs over (token block of a slot x output column
block), axis 1 over slots; a program whose token block lies past its slot's group returns at
once, so the grid is sized by the largest group (``max_tokens_per_slot``, a host int: the
launchers never read a device tensor back, so they can be captured in a CUDA graph).

Two kernels:

* shrink: ``s[i] = x[token_ids[i]] @ A[slot of i]``, float32 ``[T_lora, R]``. When the grid
  would not fill the GPU (a decode step: few tokens per slot, a small rank R), the K
  reduction is split over an extra program axis and the parts are added with float32 atomics.
* expand: ``y[token_ids[i]] += s[i] @ B[slot of i]``, read-modify-write of y's rows in y's dtype.

Precision: products accumulate in float32. float16 / bfloat16 x and A multiply on the tensor
cores in their dtype (the products are exact in float32); float32 operands (or mixed dtypes)
multiply in IEEE float32 (no TF32). In the expand, the float32 ``s`` times a half-precision B
is split as ``s_hi + s_lo`` (both in B's dtype), two tensor-core products that keep about 2x
B's mantissa bits of ``s`` ("hi/lo split"); float32 B multiplies in IEEE float32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _slot_group(slot_ends_ptr, slot):
    """(start, count) of the slot's tokens in token_ids."""
    end = tl.load(slot_ends_ptr + slot).to(tl.int32)
    start = tl.load(slot_ends_ptr + slot - 1, mask=slot > 0, other=0).to(tl.int32)
    return start, end - start


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, token_ids_ptr, slot_ends_ptr, K, R,
                   stride_xt, stride_xk, stride_al, stride_ak, stride_ar, stride_st,
                   HALF_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_n = tl.cdiv(R, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    start, count = _slot_group(slot_ends_ptr, slot)
    if pid_m * BLOCK_M >= count:
        return
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < count
    n_ok = rn < R
    tok = tl.load(token_ids_ptr + start + rm, mask=m_ok, other=0).to(tl.int64)
    x_rows = x_ptr + tok[:, None] * stride_xt
    a_base = a_ptr + slot.to(tl.int64) * stride_al + rn[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + kk[:, None] * stride_ak, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HALF_DOT:
            acc += tl.dot(x, a)
        else:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    out = s_ptr + (start + rm).to(tl.int64)[:, None] * stride_st + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=ok)
    else:
        tl.atomic_add(out, acc, mask=ok)


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, token_ids_ptr, slot_ends_ptr, R, N,
                   stride_st, stride_sr, stride_bl, stride_br, stride_bn, stride_yt, stride_yn,
                   HALF_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    slot = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    start, count = _slot_group(slot_ends_ptr, slot)
    if pid_m * BLOCK_M >= count:
        return
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < count
    n_ok = rn < N
    s_rows = s_ptr + (start + rm).to(tl.int64)[:, None] * stride_st
    b_base = b_ptr + slot.to(tl.int64) * stride_bl + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        r_ok = r < R
        s = tl.load(s_rows + r[None, :] * stride_sr, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_base + r[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if HALF_B:
            s_hi = s.to(b.dtype)
            s_lo = (s - s_hi.to(tl.float32)).to(b.dtype)
            acc += tl.dot(s_hi, b)
            acc += tl.dot(s_lo, b)
        else:
            acc += tl.dot(s, b.to(tl.float32), input_precision="ieee")
    tok = tl.load(token_ids_ptr + start + rm, mask=m_ok, other=0).to(tl.int64)
    out = y_ptr + tok[:, None] * stride_yt + rn[None, :] * stride_yn
    ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(out, mask=ok, other=0.0).to(tl.float32)
    tl.store(out, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)


def _block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _block_m(max_tokens_per_slot: int) -> int:
    return _block(max_tokens_per_slot, 16, 64)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_groups(token_ids: torch.Tensor, slot_ends: torch.Tensor, num_adapters: int, what: str) -> None:
    if token_ids.dim() != 1 or slot_ends.dim() != 1:
        raise ValueError(f"{what}: token_ids and slot_ends must be 1-D.")
    if token_ids.dtype.is_floating_point or slot_ends.dtype.is_floating_point:
        raise ValueError(f"{what}: token_ids and slot_ends must be integer tensors.")
    if slot_ends.numel() > num_adapters:
        raise ValueError(f"{what}: {slot_ends.numel()} slots but only {num_adapters} adapters.")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_ids: torch.Tensor, slot_ends: torch.Tensor,
                max_tokens_per_slot: int, *, split_k: int | None = None) -> torch.Tensor:
    """``s[i] = x[token_ids[i]] @ lora_a[slot of i]`` -> float32 ``[T_lora, R]``.

    x ``[T, K]`` (any strides); lora_a ``[L, K, R]`` (any strides: a transposed view of PEFT's
    ``[L, R, K]`` works); token_ids / slot_ends as in :func:`lora_shrink_expand`. ``split_k``
    splits the K reduction over that many programs (float32 atomics; the default picks one
    that fills the GPU, 1 off a GPU)."""
    if x.dim() != 2 or lora_a.dim() != 3 or lora_a.shape[1] != x.shape[1]:
        raise ValueError(f"lora_shrink takes x [T, K] and lora_a [L, K, R], got {tuple(x.shape)} and "
                         f"{tuple(lora_a.shape)}.")
    _check_groups(token_ids, slot_ends, lora_a.shape[0], "lora_shrink")
    K, R = lora_a.shape[1], lora_a.shape[2]
    t_lora = token_ids.numel()
    num_slots = slot_ends.numel()
    if t_lora == 0 or num_slots == 0 or max_tokens_per_slot <= 0 or K == 0:
        return torch.zeros(t_lora, R, dtype=torch.float32, device=x.device)
    block_m = _block_m(max_tokens_per_slot)
    block_n = _block(R, 16, 64)
    block_k = 64 if block_m <= 32 else 32
    programs = triton.cdiv(max_tokens_per_slot, block_m) * triton.cdiv(R, block_n)
    k_blocks = triton.cdiv(K, block_k)
    if split_k is None:
        split_k = 1
        if x.is_cuda:
            wanted = 2 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
            split_k = max(1, min(k_blocks, 32, wanted // max(1, programs * num_slots)))
    split_k = max(1, min(int(split_k), k_blocks))
    alloc = torch.empty if split_k == 1 else torch.zeros
    s = alloc(t_lora, R, dtype=torch.float32, device=x.device)
    half_dot = x.dtype in _HALF and lora_a.dtype == x.dtype
    _shrink_kernel[(programs, num_slots, split_k)](
        x, lora_a, s, token_ids, slot_ends, K, R,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), s.stride(0),
        HALF_DOT=half_dot, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return s


def lora_expand(s: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor, token_ids: torch.Tensor,
                slot_ends: torch.Tensor, max_tokens_per_slot: int) -> None:
    """``y[token_ids[i]] += s[i] @ lora_b[slot of i]`` in place.

    s ``[T_lora, R]`` (float32 as :func:`lora_shrink` returns it; other dtypes are read as
    float32); y ``[T, N]`` (any strides, e.g. a column slice); lora_b ``[L, R, N]`` (any strides);
    token_ids / slot_ends as in :func:`lora_shrink_expand`. Rows of y not in token_ids are left
    alone; a token listed twice would be a data race."""
    if s.dim() != 2 or y.dim() != 2 or lora_b.dim() != 3 or lora_b.shape[1] != s.shape[1] \
            or lora_b.shape[2] != y.shape[1] or s.shape[0] != token_ids.numel():
        raise ValueError(f"lora_expand takes s [T_lora, R], y [T, N] and lora_b [L, R, N], got {tuple(s.shape)}, "
                         f"{tuple(y.shape)} and {tuple(lora_b.shape)} for {token_ids.numel()} tokens.")
    _check_groups(token_ids, slot_ends, lora_b.shape[0], "lora_expand")
    R, N = lora_b.shape[1], lora_b.shape[2]
    num_slots = slot_ends.numel()
    if token_ids.numel() == 0 or num_slots == 0 or max_tokens_per_slot <= 0 or N == 0 or R == 0:
        return
    block_m = _block_m(max_tokens_per_slot)
    block_r = _block(R, 16, 64)
    half_b = lora_b.dtype in _HALF
    block_n = min(128 if block_m <= 32 and half_b else 64, _block(N, 16, 128))  # float32 tiles: half the width
    grid = (triton.cdiv(max_tokens_per_slot, block_m) * triton.cdiv(N, block_n), num_slots)
    _expand_kernel[grid](
        s, lora_b, y, token_ids, slot_ends, R, N,
        s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        HALF_B=half_b, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)


def lora_shrink_expand(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       token_ids: torch.Tensor, slot_ends: torch.Tensor, max_tokens_per_slot: int) -> None:
    """y[t] += (x[t] @ lora_a[s]) @ lora_b[s] for every token t served by slot s, in place.

    x [T, K]; y [T, N] (may be a non-contiguous view with unit last stride, e.g. a column slice);
    lora_a [L, K, R]; lora_b [L, R, N]; token_ids int64 [T_lora]: the indices into x/y of the
    tokens that use an adapter, grouped by slot (slot 0's tokens first, then slot 1's ...);
    slot_ends int32 [L]: cumulative ends in token_ids (slot s owns token_ids[slot_ends[s-1]:slot_ends[s]],
    slot_ends[-1] == T_lora); max_tokens_per_slot: the largest group (host int, sizes the grid).
    Tokens not in token_ids are left unchanged. Computes in float32, accumulates into y's dtype.

    token_ids must not repeat a token (its rows of y are read-modify-written by one program).
    slot_ends may be shorter than L (the later adapters are then unused); a group larger than
    max_tokens_per_slot is silently cut to it. No device value is read on the host.
    """
    if token_ids.numel() == 0:
        return
    s = lora_shrink(x, lora_a, token_ids, slot_ends, max_tokens_per_slot)
    lora_expand(s, y, lora_b, token_ids, slot_ends, max_tokens_per_slot)

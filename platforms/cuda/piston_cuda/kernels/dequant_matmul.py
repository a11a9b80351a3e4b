"""``y = x @ W.T (+ b)`` with W packed (GGUF blocks, F16/BF16/F32 rows or Piston's I8), decoded in the kernel.

The formats and their byte layouts are piston.checkpoint.packed's (llama.cpp's blocks):
each program decodes a [BLOCK_N, 32] tile of W (one block, or one 32-value sub-block of a
K-quant super-block) straight from the packed bytes into registers, multiplies it with
the [BLOCK_M, 32] tile of x and accumulates in float32. So the weights cross memory once,
packed, whatever the batch. float32 x multiplies in IEEE float32 (no TF32); float16 and
bfloat16 x multiply the decoded tile in x's dtype with float32 accumulation.

``qkernel(x, packed, bias)`` has the contract of the layers' ``qkernel`` slot
(piston.models.layers.quantized.PackedWeight: its segments and format codes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# piston.checkpoint.packed.FORMATS codes this kernel decodes.
SUPPORTED_CODES = (0, 1, 30, 2, 3, 6, 7, 8, 12, 13, 14, 1000)


@triton.jit
def _f16(p, mask):
    """The little-endian float16 at byte pointer(s) p, as float32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode(row, c, rk, ok, FMT: tl.constexpr):
    """Values 32c .. 32c+31 of the rows starting at byte pointers row [BLOCK_N, 1] -> float32
    [BLOCK_N, 32] (rows where ok is False read as 0)."""
    k = c * 32 + rk[None, :]
    if FMT == 0:  # F32
        w = tl.load((row + 4 * k).to(tl.pointer_type(tl.float32)), mask=ok, other=0.0)
    elif FMT == 1:  # F16
        w = tl.load((row + 2 * k).to(tl.pointer_type(tl.float16)), mask=ok, other=0.0).to(tl.float32)
    elif FMT == 30:  # BF16: the high half of a float32
        h = tl.load((row + 2 * k).to(tl.pointer_type(tl.uint16)), mask=ok, other=0).to(tl.uint32)
        w = (h << 16).to(tl.float32, bitcast=True)
    elif FMT == 1000:  # I8: a float32 scale, then int8 values
        s = tl.load(row.to(tl.pointer_type(tl.float32)), mask=ok, other=0.0)
        q = tl.load((row + 4 + k).to(tl.pointer_type(tl.int8)), mask=ok, other=0)
        w = q.to(tl.float32) * s
    elif FMT == 2 or FMT == 3 or FMT == 6 or FMT == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
        bb: tl.constexpr = 18 if FMT == 2 else (20 if FMT == 3 else (22 if FMT == 6 else 24))
        qs_off: tl.constexpr = bb - 16
        b = row + c * bb
        d = _f16(b, ok)
        nib = (tl.load(b + qs_off + (rk[None, :] % 16), mask=ok, other=0) >> ((rk[None, :] // 16) * 4)) & 0x0F
        q = nib.to(tl.int32)
        if FMT == 6 or FMT == 7:
            qh_off: tl.constexpr = 2 if FMT == 6 else 4
            bit = (tl.load(b + qh_off + rk[None, :] // 8, mask=ok, other=0) >> (rk[None, :] % 8)) & 1
            q = q | (bit.to(tl.int32) << 4)
        if FMT == 2:
            w = (q - 8).to(tl.float32) * d
        elif FMT == 6:
            w = (q - 16).to(tl.float32) * d
        else:
            w = d * q.to(tl.float32) + _f16(b + 2, ok)
    elif FMT == 8:  # Q8_0
        b = row + c * 34
        q = tl.load((b + 2 + rk[None, :]).to(tl.pointer_type(tl.int8)), mask=ok, other=0)
        w = q.to(tl.float32) * _f16(b, ok)
    elif FMT == 12 or FMT == 13:  # Q4_K, Q5_K: sub-block j of super-block c // 8
        bb: tl.constexpr = 144 if FMT == 12 else 176
        qs_off: tl.constexpr = 16 if FMT == 12 else 48
        j = c % 8
        b = row + (c // 8) * bb
        s = b + 4
        s_j = tl.load(s + j, mask=ok, other=0).to(tl.int32)
        s_j4 = tl.load(s + j + 4, mask=ok, other=0).to(tl.int32)
        s_jm4 = tl.load(s + tl.maximum(j - 4, 0), mask=ok, other=0).to(tl.int32)
        sc = tl.where(j < 4, s_j & 63, (s_j4 & 0x0F) | ((s_jm4 >> 6) << 4))
        mn = tl.where(j < 4, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
        nib = (tl.load(b + qs_off + 32 * (j // 2) + rk[None, :], mask=ok, other=0) >> ((j % 2) * 4)) & 0x0F
        q = nib.to(tl.int32)
        if FMT == 13:
            bit = (tl.load(b + 16 + rk[None, :], mask=ok, other=0) >> j) & 1
            q = q | (bit.to(tl.int32) << 4)
        w = (_f16(b, ok) * sc.to(tl.float32)) * q.to(tl.float32) - _f16(b + 2, ok) * mn.to(tl.float32)
    else:  # Q6_K (14): value 128h + 32k + l of a super-block
        e = c % 8
        h = e // 4
        kk = e % 4
        b = row + (c // 8) * 210
        lo = (tl.load(b + 64 * h + 32 * (kk % 2) + rk[None, :], mask=ok, other=0) >> ((kk // 2) * 4)) & 0x0F
        hi = (tl.load(b + 128 + 32 * h + rk[None, :], mask=ok, other=0) >> (2 * kk)) & 3
        q = (lo.to(tl.int32) | (hi.to(tl.int32) << 4)) - 32
        sc = tl.load((b + 192 + 2 * e + rk[None, :] // 16).to(tl.pointer_type(tl.int8)), mask=ok, other=0)
        w = q.to(tl.float32) * (_f16(b + 208, ok) * sc.to(tl.float32))
    return w


@triton.jit
def _dequant_matmul_kernel(x_ptr, w_ptr, y_ptr, b_ptr, M, N, K, stride_xm, stride_ym, row_bytes,
                           FMT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 32)
    m_ok = rm < M
    n_ok = (rn < N)[:, None]
    row = w_ptr + rn.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, K // 32):
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + c * 32 + rk[None, :], mask=m_ok[:, None],
                    other=0.0)
        w = _decode(row, c, rk, n_ok, FMT)
        if FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (rn < N)[None, :])


def dequant_matmul(x: torch.Tensor, segments: list[torch.Tensor], codes: list[int], bias: torch.Tensor | None = None,
                   block_m: int = 16, block_n: int = 32) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias)``; W's rows are ``segments`` (uint8 ``[rows, row_bytes]``) in
    format ``codes`` (piston.checkpoint.packed), one after the other. Returns ``[M, N]`` in x's dtype."""
    if x.dim() != 2 or x.shape[1] % 32:
        raise ValueError(f"dequant_matmul takes x [M, K] with K a multiple of 32, got {tuple(x.shape)}.")
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    N = sum(s.shape[0] for s in segments)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n0 = 0
    for seg, code in zip(segments, codes):
        if code not in SUPPORTED_CODES:
            raise ValueError(f"dequant_matmul: format code {code} is not supported.")
        rows = seg.shape[0]
        out = y[:, n0:n0 + rows]
        b = bias[n0:n0 + rows] if bias is not None else y  # y: an unused pointer when there is no bias
        grid = (triton.cdiv(M, block_m), triton.cdiv(rows, block_n))
        _dequant_matmul_kernel[grid](x, seg, out, b, M, rows, K, x.stride(0), y.stride(0), seg.stride(0),
                                     FMT=code, HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32,
                                     BLOCK_M=block_m, BLOCK_N=block_n)
        n0 += rows
    return y


def qkernel(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's ``qkernel`` (PackedWeight ``packed``): any leading dimensions of x."""
    shape = x.shape
    y = dequant_matmul(x.reshape(-1, shape[-1]), packed.segments, list(packed.codes), bias)
    return y.reshape(*shape[:-1], y.shape[-1])


def install_qkernels(model: torch.nn.Module) -> int:
    """Set ``qkernel`` on every layer of a loaded model whose packed weight this kernel reads
    (rows of whole 32-value chunks); returns how many. Layers left alone dequantize with torch."""
    count = 0
    for module in model.modules():
        packed = getattr(module, "qweight", None)
        if packed is not None and packed.loaded and packed.in_features % 32 == 0 and \
                all(code in SUPPORTED_CODES for code in packed.codes):
            module.qkernel = qkernel
            count += 1
    return count

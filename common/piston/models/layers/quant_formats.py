"""Packed weight rows to float, in torch: the fallback every platform can run.

``dequantize(data, fmt, cols)`` turns uint8 rows ``[rows, row_bytes]`` of a format of
``piston.checkpoint.packed.FORMATS`` into float32 ``[rows, cols]``, on the rows' device,
with the same arithmetic as ``gguf.quants`` (so the values equal what transformers and
the JAX models load). Platform kernels do the same decoding in registers instead.
"""

from __future__ import annotations

import torch


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> float32 [...] (little-endian IEEE half)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles_split(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low nibbles are values 0-15, high ones 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """[..., n] bytes -> [..., n * 8] bits, least significant first (the first ``count``)."""
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :count]


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (each [..., 8])."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return (_nibbles_split(b[..., 2:18]).float() - 8) * _f16(b[..., 0:2]).unsqueeze(-1)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles_split(b[..., 4:20]).float()
    return _f16(b[..., 0:2]).unsqueeze(-1) * q + _f16(b[..., 2:4]).unsqueeze(-1)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles_split(b[..., 6:22]) | (_bits(b[..., 2:6], 32) << 4)
    return (q.float() - 16) * _f16(b[..., 0:2]).unsqueeze(-1)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles_split(b[..., 8:24]) | (_bits(b[..., 4:8], 32) << 4)).float()
    return _f16(b[..., 0:2]).unsqueeze(-1) * q + _f16(b[..., 2:4]).unsqueeze(-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[..., 2:34].contiguous().view(torch.int8).float() * _f16(b[..., 0:2]).unsqueeze(-1)


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 128 bytes -> [..., 8, 32]: sub-block 2c is the low nibbles of bytes
    32c..32c+31, sub-block 2c+1 their high nibbles."""
    qs = qs.unflatten(-1, (4, 32))
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2).flatten(-3, -2)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _k_scales(b[..., 4:16])
    d, dmin = _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)
    w = (d * sc).unsqueeze(-1) * _k_low(b[..., 16:144]).float() - (dmin * mn).unsqueeze(-1)
    return w.flatten(-2)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _k_scales(b[..., 4:16])
    d, dmin = _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8).unsqueeze(-1)
    high = (b[..., 16:48].unsqueeze(-2) >> shifts) & 1  # [..., 8, 32]: sub-block j takes bit j
    q = (_k_low(b[..., 48:176]) | (high << 4)).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).flatten(-2)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[..., 0:128].unflatten(-1, (2, 64))
    ql = torch.stack([ql & 0x0F, ql >> 4], dim=-2).flatten(-3)  # [..., 256]
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).unsqueeze(-1)
    qh = ((b[..., 128:192].unflatten(-1, (2, 1, 32)) >> shifts) & 3).flatten(-3)  # [..., 256]
    q = ((ql | (qh << 4)).to(torch.int16) - 32).float()
    scale = b[..., 192:208].contiguous().view(torch.int8).float() * _f16(b[..., 208:210]).unsqueeze(-1)
    return q * scale.repeat_interleave(16, dim=-1)


_BLOCK_DECODERS = {"Q4_0": (_q4_0, 18), "Q4_1": (_q4_1, 20), "Q5_0": (_q5_0, 22), "Q5_1": (_q5_1, 24),
                   "Q8_0": (_q8_0, 34), "Q4_K": (_q4_k, 144), "Q5_K": (_q5_k, 176), "Q6_K": (_q6_k, 210)}


def dequantize(data: torch.Tensor, fmt: str, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 rows ``[rows, row_bytes]`` in ``fmt`` -> ``[rows, cols]`` of ``dtype``."""
    rows = data.shape[0]
    if fmt == "F32":
        w = data.contiguous().view(torch.float32)
    elif fmt == "F16":
        w = data.contiguous().view(torch.float16)
    elif fmt == "BF16":
        w = data.contiguous().view(torch.bfloat16)
    elif fmt == "I8":
        w = data[:, 4:].view(torch.int8).float() * data[:, :4].contiguous().view(torch.float32)
    elif fmt in _BLOCK_DECODERS:
        decode, block_bytes = _BLOCK_DECODERS[fmt]
        w = decode(data.reshape(rows, -1, block_bytes)).reshape(rows, cols)
    else:
        raise ValueError(f"Unknown packed weight format {fmt!r}.")
    return w.to(dtype)

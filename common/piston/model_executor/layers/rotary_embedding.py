"""Rotary position embedding (RoPE), rotate-half (GPT-NeoX / Hugging Face) layout.

The inverse frequencies are computed exactly as transformers computes them, in float32,
for the scaling types default, linear, dynamic (NTK), llama3 and yarn. Cos and sin for
every position up to ``max_position`` are computed once into ``cos_sin_cache``; a forward
pass only gathers the rows of the step's positions.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE settings as one dict with at least ``rope_theta`` and ``rope_type``.

    Reads transformers-5 ``config.rope_parameters`` and the older ``config.rope_theta`` plus
    ``config.rope_scaling`` (whose type key may be ``type`` or ``rope_type``).
    """
    params: dict[str, Any] = {}
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params.update(scaling)
    new_style = getattr(config, "rope_parameters", None)
    if isinstance(new_style, dict):
        params.update(new_style)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    # Same expression and dtype path as transformers' rope init functions.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim))


def _llama3_inv_freq(p: dict, base: float, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(p: dict, base: float, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    orig = p.get("original_max_position_embeddings") or max_position
    factor = p.get("factor") or max_position / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first ``rotary_dim`` channels of every head of q and k.

    ``inv_freq`` is ``[rotary_dim // 2]`` (one frequency set for all positions) or
    ``[max_position, rotary_dim // 2]`` (a set per position, for dynamic NTK).
    """

    kernel: Callable[..., None] | None = None

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int,
                 inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.attention_scaling = attention_scaling
        self._inv_freq = inv_freq.float().cpu()  # kept on the CPU so a meta-device build can rebuild
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.build_cache()

    def build_cache(self) -> None:
        """(Re)compute ``cos_sin_cache`` [max_position, rotary_dim] = cat(cos, sin), float32.

        Call again after moving a model built on the meta device to a real one.
        """
        device = self.cos_sin_cache.device  # computed on the CPU, then moved: same numbers everywhere
        positions = torch.arange(self.max_position, dtype=torch.float32, device="cpu")
        inv_freq = self._inv_freq
        # Same product order as transformers: float32 position times float32 inv_freq.
        freqs = positions[:, None] * (inv_freq if inv_freq.dim() == 2 else inv_freq[None, :])
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        self.cos_sin_cache = torch.cat((cos, sin), dim=-1).to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, H*D] and ``k`` [T, KVH*D] by their token ``positions`` [T].

        A platform may set ``kernel(positions, q, k, cos_sin_cache, head_dim, rotary_dim)``,
        which rotates q and k in place; None runs the torch ops below.
        """
        if self.kernel is not None:
            self.kernel(positions, q, k, self.cos_sin_cache, self.head_dim, self.rotary_dim)
            return q, k
        cos, sin = self.cos_sin_cache.index_select(0, positions).to(q.dtype).chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x = x.view(t, -1, self.head_dim)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        # Equal, bit for bit, to transformers' x * cos + rotate_half(x) * sin.
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
        return out.reshape(t, -1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position={self.max_position}"


def get_rope(config: Any, head_dim: int, max_position: int | None = None) -> RotaryEmbedding:
    """The RotaryEmbedding a Hugging Face ``config`` describes, for heads of ``head_dim``.

    Dynamic NTK matches transformers' incremental decoding: a position ``p`` beyond
    ``max_position_embeddings`` uses the frequencies transformers would use for a
    sequence of length ``p + 1``; inside the original context it equals default RoPE.
    A GGUF file's per-dimension ``rope_freq_factors`` (llama.cpp's rope_freqs) divide
    the frequencies, as llama.cpp does.
    """
    p = rope_parameters(config)
    rope_type = p["rope_type"]
    base = float(p["rope_theta"])
    rotary_dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    model_max = int(getattr(config, "max_position_embeddings", 0) or 2048)
    max_position = max_position or model_max
    attention_scaling = 1.0
    if rope_type == "default":
        inv_freq = _base_inv_freq(base, rotary_dim)
    elif rope_type == "linear":
        inv_freq = _base_inv_freq(base, rotary_dim) / p["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(p, base, rotary_dim)
    elif rope_type == "yarn":
        inv_freq, attention_scaling = _yarn_inv_freq(p, base, rotary_dim, model_max)
    elif rope_type == "dynamic":
        factor = p["factor"]
        max_position = max(max_position, int(model_max * factor))
        seq_len = torch.arange(1, max_position + 1, dtype=torch.float64, device="cpu").clamp(min=model_max)
        bases = (base * ((factor * seq_len / model_max) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2)))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
        # Inside the original context the factor term is exactly 1, as in transformers.
        inv_freq = 1.0 / (bases.float()[:, None] ** exponents[None, :])
        inv_freq[:model_max] = _base_inv_freq(base, rotary_dim)
    else:
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    factors = getattr(config, "rope_freq_factors", None)
    if factors is not None:
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32, device="cpu")
    return RotaryEmbedding(head_dim, rotary_dim, max_position, inv_freq, attention_scaling)

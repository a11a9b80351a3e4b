"""RoPE tables in numpy: the same frequencies as the torch models, without torch.

Inverse frequencies follow transformers (float32) for default, linear, dynamic (NTK),
llama3 and yarn scaling, and a GGUF file's per-dimension ``rope_freq_factors``. The
model gathers rows of the ``cos`` / ``sin`` tables [max_position, rotary_dim // 2].
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class RopeTables(NamedTuple):
    cos: np.ndarray  # [max_position, rotary_dim // 2] float32, attention scaling applied
    sin: np.ndarray
    rotary_dim: int


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE settings: transformers-5 ``rope_parameters`` or older ``rope_scaling``."""
    params: dict[str, Any] = {}
    for attr in ("rope_scaling", "rope_parameters"):
        value = getattr(config, attr, None)
        if isinstance(value, dict):
            params.update(value)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    return params


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _llama3_inv_freq(p: dict, base: float, dim: int) -> np.ndarray:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(p: dict, base: float, dim: int, max_position: int) -> tuple[np.ndarray, float]:
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
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), attention_factor


def rope_tables(config: Any, head_dim: int, max_position: int | None = None) -> RopeTables:
    """cos/sin tables for every position below ``max_position`` (default: the model's context).

    Raises ValueError for a RoPE scaling type that is not supported.
    """
    p = rope_parameters(config)
    rope_type = p["rope_type"]
    base = float(p["rope_theta"])
    rotary_dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    model_max = int(getattr(config, "max_position_embeddings", 0) or 2048)
    max_position = max(max_position or 0, model_max)
    scaling = 1.0
    if rope_type == "default":
        inv_freq = _base_inv_freq(base, rotary_dim)
    elif rope_type == "linear":
        inv_freq = _base_inv_freq(base, rotary_dim) / np.float32(p["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(p, base, rotary_dim)
    elif rope_type == "yarn":
        inv_freq, scaling = _yarn_inv_freq(p, base, rotary_dim, model_max)
    elif rope_type == "dynamic":
        factor = p["factor"]
        max_position = max(max_position, int(model_max * factor))
        seq_len = np.maximum(np.arange(1, max_position + 1, dtype=np.float64), model_max)
        bases = base * ((factor * seq_len / model_max) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        exponents = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(rotary_dim)
        inv_freq = (1.0 / (bases.astype(np.float32)[:, None] ** exponents[None, :])).astype(np.float32)
        # Inside the original context the factor term is exactly 1, as in transformers.
        inv_freq[:model_max] = _base_inv_freq(base, rotary_dim)
    else:
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    factors = getattr(config, "rope_freq_factors", None)
    if factors is not None:
        inv_freq = (inv_freq / np.asarray(factors, dtype=np.float32)).astype(np.float32)
    positions = np.arange(max_position, dtype=np.float32)
    freqs = positions[:, None] * (inv_freq if inv_freq.ndim == 2 else inv_freq[None, :])
    cos = (np.cos(freqs) * np.float32(scaling)).astype(np.float32)
    sin = (np.sin(freqs) * np.float32(scaling)).astype(np.float32)
    return RopeTables(cos, sin, rotary_dim)

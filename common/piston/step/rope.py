"""RoPE tables: cos and sin for every position, as numpy arrays, for every platform.

The inverse frequencies follow transformers' rope init functions operation by operation,
in float32, for the scaling types default, linear, dynamic (NTK), llama3 and yarn, plus a
GGUF file's per-dimension ``rope_freq_factors`` (llama.cpp's rope_freqs). The angles are
float32 products, as in transformers; their cos and sin are evaluated in float64 and
rounded once. The torch models (piston.models.layers.rotary_embedding) and the JAX models
(piston_tpu) both gather rows of these tables, so the platforms use the very same numbers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_F32 = np.float32


class RopeTables(NamedTuple):
    cos: np.ndarray  # [max_position, rotary_dim // 2] float32, attention scaling applied
    sin: np.ndarray
    rotary_dim: int


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


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    # transformers: 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), all float32.
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(_F32) / _F32(dim)
    return _F32(1.0) / (_F32(base) ** exponents)


def _llama3_inv_freq(p: dict, base: float, dim: int) -> np.ndarray:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = _F32(p["factor"]), _F32(p["low_freq_factor"]), _F32(p["high_freq_factor"])
    old_len = _F32(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = _F32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (_F32(1) - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(_F32)


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
    ramp = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1).astype(_F32)
    pos_freqs = _F32(base) ** (np.arange(0, dim, 2).astype(_F32) / _F32(dim))
    extrapolation = _F32(1) - ramp
    inv_freq = (_F32(1.0) / (_F32(factor) * pos_freqs)) * (_F32(1) - extrapolation) \
        + (_F32(1.0) / pos_freqs) * extrapolation
    return inv_freq.astype(_F32), attention_factor


def inv_frequencies(config: Any, head_dim: int, max_position: int | None = None
                    ) -> tuple[np.ndarray, int, int, float]:
    """(inverse frequencies, rotary_dim, table length, attention scaling) for ``config``.

    The frequencies are ``[rotary_dim // 2]`` float32, or ``[table length, rotary_dim // 2]``
    for dynamic NTK, which matches transformers' incremental decoding: a position ``p``
    beyond ``max_position_embeddings`` uses the frequencies transformers would use for a
    sequence of length ``p + 1``; inside the original context it equals default RoPE.
    Raises ValueError for a RoPE scaling type that is not supported.
    """
    p = rope_parameters(config)
    rope_type = p["rope_type"]
    base = float(p["rope_theta"])
    rotary_dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    model_max = int(getattr(config, "max_position_embeddings", 0) or 2048)
    length = max(max_position or 0, model_max)
    scaling = 1.0
    if rope_type == "default":
        inv_freq = _base_inv_freq(base, rotary_dim)
    elif rope_type == "linear":
        inv_freq = _base_inv_freq(base, rotary_dim) / _F32(p["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(p, base, rotary_dim)
    elif rope_type == "yarn":
        inv_freq, scaling = _yarn_inv_freq(p, base, rotary_dim, model_max)
    elif rope_type == "dynamic":
        factor = p["factor"]
        length = max(length, int(model_max * factor))
        seq_len = np.maximum(np.arange(1, length + 1, dtype=np.float64), model_max)
        bases = base * ((factor * seq_len / model_max) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(_F32) / _F32(rotary_dim)
        inv_freq = _F32(1.0) / (bases.astype(_F32)[:, None] ** exponents[None, :])
        # Inside the original context the factor term is exactly 1, as in transformers.
        inv_freq[:model_max] = _base_inv_freq(base, rotary_dim)
    else:
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    factors = getattr(config, "rope_freq_factors", None)
    if factors is not None:
        inv_freq = inv_freq / np.asarray(factors, dtype=_F32)
    return inv_freq.astype(_F32), rotary_dim, length, scaling


def rope_tables(config: Any, head_dim: int, max_position: int | None = None) -> RopeTables:
    """cos/sin tables for every position below ``max_position`` (at least the model's context).

    Raises ValueError for a RoPE scaling type that is not supported.
    """
    inv_freq, rotary_dim, length, scaling = inv_frequencies(config, head_dim, max_position)
    positions = np.arange(length, dtype=_F32)
    # Same product as transformers: float32 position times float32 inverse frequency.
    angles = positions[:, None] * (inv_freq if inv_freq.ndim == 2 else inv_freq[None, :])
    angles = angles.astype(np.float64)
    cos = (np.cos(angles) * scaling).astype(_F32)
    sin = (np.sin(angles) * scaling).astype(_F32)
    return RopeTables(cos, sin, rotary_dim)

"""Which attention each decoder layer runs, full or a sliding window, and with which RoPE.

Torch-free, so the torch models, the JAX models and the KV cache manager (``kv_lookback``)
read the same answer from a Hugging Face config (a transformers config or a PlainConfig alike):

- ``layer_types``: transformers-5 configs list them (Gemma 3, Qwen2/3 with
  ``use_sliding_window``); older config.json files give Gemma 3's ``sliding_window_pattern``
  (every n-th layer global), and Mistral, Mixtral and Qwen3-MoE slide every layer when
  ``sliding_window`` is set (and, for Qwen3-MoE, ``use_sliding_window``).
- Gemma 3's local and global layers rotate with different RoPE bases (and only the global
  ones are scaled): ``rope_config`` gives the settings of one layer type.
"""

from __future__ import annotations

from typing import Any

from piston.step.plain_config import PlainConfig

FULL = "full_attention"
SLIDING = "sliding_attention"
# Gemma 3's defaults when a config.json names no per-type RoPE (transformers' default_theta).
_GEMMA3_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}


def layer_types(config: Any) -> list[str]:
    """FULL or SLIDING for each decoder layer of ``config``.

    Raises ValueError for a ``layer_types`` list of the wrong length or with another kind
    of layer (e.g. linear attention), which Piston does not implement.
    """
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    model_type = getattr(config, "model_type", "")
    if types:
        # An EAGLE head's config may keep its target's longer list: its layers come first.
        types = list(types)[:n]
        if len(types) != n or any(t not in (FULL, SLIDING) for t in types):
            raise ValueError(f"layer_types must name {FULL!r} or {SLIDING!r} for each of the {n} layers; "
                             f"got {types}.")
    elif model_type == "gemma3_text":
        pattern = int(getattr(config, "sliding_window_pattern", None)
                      or getattr(config, "_sliding_window_pattern", None) or 6)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    elif model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False) and window:
        first = int(getattr(config, "max_window_layers", 0))
        types = [SLIDING if i >= first else FULL for i in range(n)]
    elif model_type in ("mistral", "mixtral") and window or model_type == "qwen3_moe" and window and getattr(
            config, "use_sliding_window", False):
        types = [SLIDING] * n
    else:
        types = [FULL] * n
    if SLIDING in types and not (isinstance(window, int) and window >= 1):
        raise ValueError(f"The config has sliding-window layers but sliding_window={window!r}; it must be a "
                         "positive number of tokens.")
    return types


def sliding_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window in tokens, None for a full-attention layer."""
    window = getattr(config, "sliding_window", None)
    return [window if t == SLIDING else None for t in layer_types(config)]


def kv_lookback(config: Any) -> int | None:
    """How far back any layer of ``config`` reads the KV cache: the longest sliding window
    when every layer slides (the query at position p reads keys from p - W + 1 on), None
    when some layer attends to the whole context. The KV cache manager frees the blocks
    that fall behind it (piston.core.kv_cache_manager)."""
    windows = sliding_windows(config)
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)


def rope_config(config: Any, layer_type: str) -> Any:
    """A config whose RoPE settings are those of ``layer_type`` layers, for
    ``piston.step.rope.rope_tables``; ``config`` itself when every layer rotates alike."""
    params = getattr(config, "rope_parameters", None)
    nested = isinstance(params, dict) and (FULL in params or SLIDING in params)
    if not nested and getattr(config, "model_type", "") != "gemma3_text":
        return config
    if nested and params.get(layer_type):
        p = dict(params[layer_type])
    elif layer_type == SLIDING:  # a transformers-4 Gemma 3 config.json: the local base, no scaling
        p = {"rope_type": "default",
             "rope_theta": getattr(config, "rope_local_base_freq", None) or _GEMMA3_THETA[SLIDING]}
    else:
        scaling = getattr(config, "rope_scaling", None)
        p = {"rope_type": "default", **(scaling if isinstance(scaling, dict) else {}),
             "rope_theta": getattr(config, "rope_theta", None) or _GEMMA3_THETA[FULL]}
    values = {"rope_parameters": p, "max_position_embeddings": getattr(config, "max_position_embeddings", None)}
    for name in ("partial_rotary_factor", "rope_freq_factors"):
        if getattr(config, name, None) is not None:
            values[name] = getattr(config, name)
    return PlainConfig(values)

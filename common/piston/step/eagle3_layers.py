"""Which target layers an EAGLE-3 head reads (torch-free: every platform asks)."""

from __future__ import annotations

from typing import Any


def aux_layer_ids(head_config: Any, target_num_layers: int) -> tuple[int, ...]:
    """The target layers whose inputs the head reads: the checkpoint's, else vLLM's default."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None)
    eagle_config = getattr(head_config, "eagle_config", None)
    if not ids and isinstance(eagle_config, dict):
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
    ids = tuple(int(i) for i in ids) if ids else (2, target_num_layers // 2, target_num_layers - 3)
    if len(ids) != 3 or not all(0 <= i < target_num_layers for i in ids):
        raise ValueError(f"EAGLE-3 aux layers {ids}: expected three ids below the target's {target_num_layers} "
                         "layers.")
    return ids

"""KVCacheLayout: how the decoder layers share the paged KV cache (vLLM's KV cache groups).

Torch-free: the scheduler's KV cache manager, every worker and every runner derive the same
layout from the engine config.

A model whose layers all attend alike (all full, or all the same sliding window) has one
group of every layer: one block table per request, one cache tensor per layer, and a block
id names a slot range in every layer. A model that mixes full and sliding-window layers
(Gemma 3's five local layers per global one) is *hybrid*: its layers are cut into groups of
equal size ``S``, each group of one kind, and each group gets its own block table, so a
sliding group can free the blocks behind its window while the full group keeps its whole
context. The cache holds ``S`` tensors; the i-th layer of every group uses tensor i, so one
block id of the shared pool is ``S`` layers' worth of memory whichever group holds it. ``S``
is the size of the smallest kind, and a kind whose count it does not divide ends with a
smaller group (its last tensors unused by that group): vLLM's rule.

The hybrid layout is off (one group; all-sliding models still free blocks behind the
window) when ``CacheConfig.disable_hybrid_kv_cache_manager`` is set, when a draft model or
EAGLE head reads the same blocks with full attention, and with the KV offload tier, which
stores one block per hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from piston.step.layer_types import sliding_windows

if TYPE_CHECKING:
    from piston.step.config import EngineConfig


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers that share a block table: all full attention (``sliding_window`` None) or all
    the same window."""

    layers: tuple[int, ...]
    sliding_window: int | None


@dataclass(frozen=True)
class KVCacheLayout:
    groups: tuple[KVCacheGroup, ...]
    num_cache_layers: int  # cache tensors: each block id is this many layers' memory
    layer_group: tuple[int, ...]  # per decoder layer: its group
    layer_cache: tuple[int, ...]  # per decoder layer: its cache tensor

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def hybrid(self) -> bool:
        return len(self.groups) > 1


def single_group_layout(num_layers: int, sliding_window: int | None) -> KVCacheLayout:
    """Every layer in one group; ``sliding_window``: behind it the manager frees blocks."""
    return KVCacheLayout((KVCacheGroup(tuple(range(num_layers)), sliding_window),), num_layers,
                         (0,) * num_layers, tuple(range(num_layers)))


def group_layers(windows: Sequence[int | None]) -> KVCacheLayout:
    """The layout for layers with these windows (None: full attention): one group when all
    are alike, else groups of the smallest kind's size, kinds in order of first layer."""
    n = len(windows)
    kinds: dict[int | None, list[int]] = {}
    for layer, w in enumerate(windows):
        kinds.setdefault(w, []).append(layer)
    if len(kinds) <= 1:
        return single_group_layout(n, windows[0] if n else None)
    size = min(len(layers) for layers in kinds.values())
    groups = []
    layer_group, layer_cache = [0] * n, [0] * n
    for w, layers in kinds.items():
        for start in range(0, len(layers), size):
            chunk = tuple(layers[start:start + size])
            for i, layer in enumerate(chunk):
                layer_group[layer], layer_cache[layer] = len(groups), i
            groups.append(KVCacheGroup(chunk, w))
    return KVCacheLayout(tuple(groups), size, tuple(layer_group), tuple(layer_cache))


def hybrid_blocker(config: "EngineConfig") -> str | None:
    """Why this engine keeps one block table although its model mixes layer kinds (None: the
    model does not, or nothing stops the hybrid layout)."""
    hf_config: Any = config.model_config.hf_config
    if getattr(hf_config, "num_hidden_layers", None) is None or not group_layers(sliding_windows(hf_config)).hybrid:
        return None
    spec = config.speculative_config
    if config.cache_config.disable_hybrid_kv_cache_manager:
        return "--disable-hybrid-kv-cache-manager is set"
    if spec is not None and spec.uses_draft_model:
        return "a draft model or EAGLE head attends over the same blocks with full attention"
    if config.cache_config.kv_offloading:
        return "the KV offload tier stores one block per hash"
    return None


def kv_cache_layout(config: "EngineConfig") -> KVCacheLayout:
    """This engine's layout (see the module docstring). A model without layers (a test's
    scheduler alone) gets one group of no layers and no window."""
    hf_config: Any = config.model_config.hf_config
    if getattr(hf_config, "num_hidden_layers", None) is None:
        return single_group_layout(0, None)
    windows = sliding_windows(hf_config)
    layout = group_layers(windows)
    if not layout.hybrid and layout.groups[0].sliding_window is not None and not _may_release(config):
        return single_group_layout(len(windows), None)
    if hybrid_blocker(config) is not None:
        return single_group_layout(len(windows), None)
    return layout


def _may_release(config: "EngineConfig") -> bool:
    """An all-sliding model frees blocks behind its window unless a drafter reads them."""
    spec = config.speculative_config
    return spec is None or not spec.uses_draft_model


def blocks_per_sequence(layout: KVCacheLayout, max_model_len: int, block_size: int,
                        max_num_batched_tokens: int) -> int:
    """The most blocks one request can hold at once over all groups: a full group its whole
    context, a sliding one the window's blocks behind a step's first query plus the step's
    tokens (vLLM's sliding-window bound)."""
    whole = -(-max_model_len // block_size)
    total = 0
    for group in layout.groups:
        w = group.sliding_window
        total += whole if w is None else min(whole, -(-(w - 1 + max_num_batched_tokens) // block_size) + 1)
    return total

"""The forward context: per-step state that attention layers read during a forward pass.

The runner sets it around each model call, so the model's own code (and anything a
compiler traces) never depends on attention metadata or on the KV cache tensors. The
compiled model's opaque attention op (piston.compilation.attention_op) finds its layer
in ``attn_layers`` and the step's metadata here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch


@dataclass
class ForwardContext:
    # Backend-specific metadata built by the platform's attention backend for this step.
    # None while the compiler traces the model: attention then treats the tokens as one
    # causal sequence with no cache.
    attn_metadata: Any
    # One KV cache tensor per attention layer, indexed by the layer's ``layer_idx``.
    kv_caches: list[torch.Tensor]
    # The platform's attention implementation (see piston.attention.backend).
    attn_impl: Any
    # The model's Attention layers by ``layer_idx`` (piston.attention.layer.attention_layers):
    # the compiled model's attention op carries only the index.
    attn_layers: Mapping[int, Any] = field(default_factory=dict)
    # A hybrid KV cache (piston.step.kv_cache_layout): each layer's group. ``attn_metadata``
    # is then a list with one entry per group, built from that group's block table.
    layer_group: Sequence[int] | None = None

    def layer_metadata(self, layer_idx: int) -> Any:
        """The metadata attention layer ``layer_idx`` attends with (None while tracing)."""
        md = self.attn_metadata
        if self.layer_group is None or md is None:
            return md
        return md[self.layer_group[layer_idx]]


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext | None:
    """The context of the forward pass that is running, or None outside one."""
    return _current


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _current
    prev, _current = _current, ctx
    try:
        yield
    finally:
        _current = prev

"""Attention: the layer every model calls; the platform's backend does the work."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from piston.attention.forward_context import get_forward_context
from piston.compilation import attention_op


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads over the paged KV cache.

    ``forward(q, k, v)`` takes the step's flattened tokens ``[num_tokens, heads * head_dim]``
    (after rotary embedding) and returns ``[num_tokens, num_heads * head_dim]``.
    Inside a forward context the platform backend writes k/v into this layer's paged
    cache and attends over each sequence's whole context. Outside one (unit tests of a
    model), or in a context without metadata (a compiler's trace run), the tokens are
    treated as one causal sequence with no cache.

    Under torch.compile the layer calls the opaque ``piston::attention`` op instead, so
    the compiler splits the graph here and nothing it traces depends on the metadata.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Allocated inside the compiled piece before the op, so a captured graph owns it
            # and the op writes at the same address on every replay.
            out = q.new_empty((q.shape[0], self.num_heads * self.head_dim))
            attention_op.attention(q, k, v, out, self.layer_idx)
            return out
        ctx = get_forward_context()
        if ctx is None or ctx.attn_metadata is None:
            return self.forward_no_cache(q, k, v)
        return ctx.attn_impl.forward(self, q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn_metadata)

    def forward_no_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the tokens over each other, as one sequence (no KV cache)."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = k.view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(0, 1).reshape(t, self.num_heads * self.head_dim)


def attention_layers(model: nn.Module) -> dict[int, Attention]:
    """The model's Attention layers by ``layer_idx``, for ``ForwardContext.attn_layers``.

    Raises ValueError when two layers share an index (their KV caches would collide).
    """
    layers: dict[int, Attention] = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            if module.layer_idx in layers:
                raise ValueError(f"Two attention layers have layer_idx={module.layer_idx} ({name}); "
                                 "each layer needs its own index into the KV caches.")
            layers[module.layer_idx] = module
    return layers

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

    ``sliding_window`` W (None: the whole context): the query at position p attends to the
    keys at positions p - W + 1 .. p only, as transformers' sliding-window mask has it.
    Every backend applies it.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 layer_idx: int, sliding_window: int | None = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 (or None), not {sliding_window}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window

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
        return ctx.attn_impl.forward(self, q, k, v, ctx.kv_caches[self.layer_idx], ctx.layer_metadata(self.layer_idx))

    def forward_no_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the tokens over each other, as one sequence (no KV cache)."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = k.view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        gqa = self.num_heads != self.num_kv_heads
        if self.sliding_window is not None and self.sliding_window < t:
            mask = window_mask(torch.arange(t, device=q.device), t, self.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        return out.transpose(0, 1).reshape(t, self.num_heads * self.head_dim)


def window_mask(q_pos: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[len(q_pos), num_keys] bool, True = attend: causal over keys at positions
    0 .. num_keys - 1, limited to the last ``window`` keys of each query (None: no limit)."""
    key_pos = torch.arange(num_keys, device=q_pos.device)[None, :]
    mask = key_pos <= q_pos[:, None]
    if window is not None:
        mask &= key_pos > q_pos[:, None] - window
    return mask


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

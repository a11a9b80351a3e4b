"""Rotary position embedding (RoPE), rotate-half (GPT-NeoX / Hugging Face) layout.

The cos/sin tables come from the step layer (piston.step.rope), computed once per model
for every position up to ``max_position``, exactly as the JAX models get them; a forward
pass only gathers the rows of the step's positions.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from piston.step.rope import SUPPORTED_ROPE_TYPES, RopeTables, rope_tables

__all__ = ["RotaryEmbedding", "get_rope", "SUPPORTED_ROPE_TYPES"]


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first ``rotary_dim`` channels of every head of q and k."""

    kernel: Callable[..., None] | None = None

    def __init__(self, head_dim: int, tables: RopeTables) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = tables.rotary_dim
        self.max_position = len(tables.cos)
        self._tables = tables  # kept on the host so a meta-device build can rebuild
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.build_cache()

    def build_cache(self) -> None:
        """(Re)fill ``cos_sin_cache`` [max_position, rotary_dim] = cat(cos, sin), float32.

        Call again after moving a model built on the meta device to a real one.
        """
        device = self.cos_sin_cache.device
        if device.type == "meta":
            self.cos_sin_cache = torch.empty((self.max_position, self.rotary_dim), device=device)
            return
        table = np.concatenate((self._tables.cos, self._tables.sin), axis=-1)
        self.cos_sin_cache = torch.from_numpy(table).to(device)

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
    """The RotaryEmbedding a Hugging Face ``config`` describes, for heads of ``head_dim``
    (see piston.step.rope for the scaling types). Raises ValueError for an unsupported one."""
    return RotaryEmbedding(head_dim, rope_tables(config, head_dim, max_position))

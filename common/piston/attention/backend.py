"""AttentionImpl: the interface a platform's attention backend implements."""

from __future__ import annotations

import abc
from typing import Any

import torch

from piston.attention.metadata import CommonAttentionMetadata


class AttentionImpl(abc.ABC):
    """A platform's paged-attention kernel set.

    The runner calls ``build_metadata`` once per step; every attention layer then calls
    ``forward`` with that result and its own KV cache tensor.
    """

    name: str = ""

    @abc.abstractmethod
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor."""

    @abc.abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Turn the step's neutral metadata into this backend's kernel arguments."""

    @abc.abstractmethod
    def forward(self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: Any, output: torch.Tensor | None = None) -> torch.Tensor:
        """Write k/v at the slot mapping, then attend: returns [num_tokens, heads * head_dim].

        ``layer`` carries num_heads, num_kv_heads, head_dim and scale. ``output``, when given,
        is a contiguous [>= num_tokens, heads * head_dim] buffer of q's dtype (the compiled
        model's): a backend may write its result into its first rows and return that view,
        which saves the caller a copy; returning other memory is correct too.
        """

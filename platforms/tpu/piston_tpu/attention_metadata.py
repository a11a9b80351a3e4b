"""AttentionMetadata: where a step's tokens sit in their sequences and in the paged cache.

Built by the runner with numpy, padded to the step's token bucket and to the engine's
``max_num_seqs`` so its shapes never change between steps: only values do. Both attention
paths (the Pallas kernel and plain JAX) take the same metadata.

A step's metadata (piston_tpu.step_inputs) holds every KV cache group's slots and pages
(piston.step.kv_cache_layout; one group unless the model is hybrid): ``slot_mapping``
[G, T] and ``page_indices`` [G, S, pages_per_seq]. The model picks a layer's group with
``group_metadata``; the attention functions see one group's, the shapes documented below.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax


class AttentionMetadata(NamedTuple):
    # Per token, [T]: the cache slot its k/v go to (padding: an out-of-range slot, dropped),
    # its position in its sequence (padding: -1) and its sequence's index (padding: 0).
    slot_mapping: jax.Array
    token_positions: jax.Array
    token_seqs: jax.Array
    # Per sequence, [S] and [S + 1]: context length after this step, and the start of each
    # sequence's queries in the flattened tokens (padding repeats the total).
    kv_lens: jax.Array
    cu_q_lens: jax.Array
    # [S, pages_per_seq] int32: each sequence's cache pages (padding: page 0, never attended).
    page_indices: jax.Array
    # [1] int32: how many sequences are real.
    num_seqs: jax.Array


def group_metadata(md: AttentionMetadata, group) -> AttentionMetadata:
    """The metadata of KV cache ``group`` (an int, or a traced int32 under the layer scan)
    from a step's, whose slot mapping and page table have a leading group axis; metadata
    without one (a single group's) is returned as it is."""
    if md.slot_mapping.ndim == 1:
        return md
    if isinstance(group, int):
        return md._replace(slot_mapping=md.slot_mapping[group], page_indices=md.page_indices[group])
    return md._replace(slot_mapping=lax.dynamic_index_in_dim(md.slot_mapping, group, keepdims=False),
                       page_indices=lax.dynamic_index_in_dim(md.page_indices, group, keepdims=False))

"""AttentionMetadata: where a step's tokens sit in their sequences and in the paged cache.

Built by the runner with numpy, padded to the step's token bucket and to the engine's
``max_num_seqs`` so its shapes never change between steps: only values do. Both attention
paths (the Pallas kernel and plain JAX) take the same metadata.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


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

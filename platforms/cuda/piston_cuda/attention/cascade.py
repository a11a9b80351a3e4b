"""When to run cascade attention: shared prefix once for the whole batch, suffixes apart.

Without cascade, every query block of every request streams the shared prefix's keys
(a system prompt read again for each request). With cascade, the prefix pass streams
them once per query block of the *whole batch* (queries of different requests share a
block), then each request attends to its own suffix, and a merge kernel combines the two
with their log-sum-exps. The extra pass and merge cost a launch and a read/write of the
outputs, so cascade must save a clear share of the prefix reads.

The heuristic (documented, deliberately simple):
  1. the usable prefix is the shared blocks that every scheduled request has already
     computed, whole blocks only (the prefix pass is not causal, so no query may sit
     inside it);
  2. it must be at least ``CASCADE_MIN_PREFIX_TOKENS`` long and the batch at least
     ``CASCADE_MIN_REQUESTS`` requests, below which the saving is lost in launch overhead;
  3. prefix reads with cascade (query blocks of the batch, ``ceil(num_tokens / BLOCK_Q)``)
     must be at most ``1 / CASCADE_MIN_SAVING`` of the reads without it (the sum over
     requests of their own query blocks). Decode batches of many requests pass easily;
     batches of long prompts, whose query blocks already amortize the prefix, do not.
"""

from __future__ import annotations

import numpy as np

CASCADE_MIN_PREFIX_TOKENS = 256
CASCADE_MIN_REQUESTS = 8
CASCADE_MIN_SAVING = 2.0


def usable_prefix_len(num_common_prefix_blocks: int, block_size: int, num_computed_tokens: np.ndarray) -> int:
    """Tokens of the shared prefix that cascade may use: whole blocks that every request
    has already computed (so every query of the step lies after them)."""
    if num_common_prefix_blocks <= 0 or len(num_computed_tokens) == 0:
        return 0
    n = min(num_common_prefix_blocks * block_size, int(num_computed_tokens.min()))
    return n // block_size * block_size


def use_cascade_attention(prefix_len: int, query_lens: np.ndarray, block_q: int, prefix_block_q: int) -> bool:
    """True when cascade attention should run (see the module docstring).

    ``block_q``: queries per query block of the normal pass; ``prefix_block_q``: of the
    prefix pass (which sees every query of the step as one sequence).
    """
    num_reqs = len(query_lens)
    if prefix_len < CASCADE_MIN_PREFIX_TOKENS or num_reqs < CASCADE_MIN_REQUESTS:
        return False
    reads_without = int(np.sum(-(-query_lens // block_q)))
    reads_with = -(-int(np.sum(query_lens)) // prefix_block_q)
    return reads_with * CASCADE_MIN_SAVING <= reads_without

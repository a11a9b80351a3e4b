"""Backend-neutral attention metadata for one step, built by the model runner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CommonAttentionMetadata:
    """Where each sequence's queries are in the step and where its KV lives.

    The step's tokens are flattened: the queries of request i are rows
    ``query_start_loc[i]:query_start_loc[i+1]``, at absolute positions
    ``seq_lens[i] - query_len .. seq_lens[i] - 1`` of the sequence.
    """

    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc_np: np.ndarray  # [num_reqs + 1] int32
    seq_lens_np: np.ndarray  # [num_reqs] int32, context length after this step
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, on the device
    seq_lens: torch.Tensor  # [num_reqs] int32, on the device
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, on the device
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64: where each token's K/V goes
    block_size: int
    # Blocks shared by every request in the step (cascade attention may use it).
    num_common_prefix_blocks: int = 0

    @property
    def query_lens_np(self) -> np.ndarray:
        return np.diff(self.query_start_loc_np)

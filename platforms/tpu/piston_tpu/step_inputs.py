"""StepInputs: one step's model inputs as numpy arrays padded to fixed shapes.

Built from the persistent InputBatch with vector operations only. Tokens are padded to
the step's token bucket; per-sequence arrays to ``max_seqs`` (the largest request
bucket), so the forward program of a token bucket serves any number of requests.

The slot mapping and page table have a leading axis of KV cache groups, one per block
table of the batch (piston.step.kv_cache_layout; one group unless the model is hybrid):
``metadata.slot_mapping`` [G, bucket], ``metadata.page_indices`` [G, max_seqs, pages].
``group(g)`` gives a step of group ``g``'s metadata alone (a draft model's or EAGLE head's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from piston.step.input_batch import InputBatch, ScheduledTokens

from piston_tpu.attention_metadata import AttentionMetadata, group_metadata


@dataclass
class StepInputs:
    rows: np.ndarray  # [R] batch rows scheduled this step, in batch order
    num_scheduled: np.ndarray  # [R]
    query_start: np.ndarray  # [R + 1] int32
    num_tokens: int  # real tokens this step
    bucket: int  # padded token count
    input_ids: np.ndarray  # [bucket] int32
    positions: np.ndarray  # [bucket] int32 (padding: 0, a valid RoPE row)
    metadata: AttentionMetadata  # numpy arrays, see attention_metadata; per KV cache group (above)

    def group(self, g: int) -> "StepInputs":
        """This step with KV cache group ``g``'s metadata only (no group axis)."""
        return replace(self, metadata=group_metadata(self.metadata, g))


class StepInputBuilder:
    """Reuses its per-sequence buffers between steps; returns fresh token arrays."""

    def __init__(self, batch: InputBatch, block_size: int, num_slots: int, max_seqs: int,
                 pages_per_seq: int) -> None:
        self.batch = batch
        self.block_size = block_size
        self.num_slots = num_slots  # padding tokens write to this (out-of-range) slot
        self.max_seqs = max_seqs
        # One page table per KV cache group. Entries past a sequence's own blocks keep stale
        # (valid) page ids: never attended.
        self.page_table = np.zeros((batch.block_table.shape[0], max_seqs, pages_per_seq), np.int32)

    def build(self, scheduled: ScheduledTokens, bucket: int, token_shift: int = 0) -> StepInputs:
        """The step's inputs padded to the token ``bucket`` (``token_shift``: each position
        reads the token that many places later, as an EAGLE head does)."""
        batch = self.batch
        rows, num_sched, cu, computed, positions = (scheduled.rows, scheduled.num_scheduled,
                                                    scheduled.cu_num_scheduled, scheduled.num_computed,
                                                    scheduled.positions)
        n, total = len(rows), scheduled.num_tokens
        req_idx, token_rows = scheduled.req_idx, scheduled.token_rows
        blocks = scheduled.block_numbers.astype(np.int64)  # [groups, total]

        input_ids = np.zeros(bucket, np.int32)
        input_ids[:total] = batch.token_ids[token_rows, positions + token_shift]
        pos = np.zeros(bucket, np.int32)
        pos[:total] = positions
        token_positions = np.full(bucket, -1, np.int32)
        token_positions[:total] = positions
        token_seqs = np.zeros(bucket, np.int32)
        token_seqs[:total] = req_idx
        slots = np.full((len(blocks), bucket), self.num_slots, np.int32)
        slots[:, :total] = blocks * self.block_size + positions % self.block_size

        query_start = np.zeros(self.max_seqs + 1, np.int32)
        query_start[1:n + 1] = cu
        query_start[n + 1:] = total
        kv_lens = np.zeros(self.max_seqs, np.int32)
        kv_lens[:n] = computed + num_sched
        max_blocks = int(batch.num_blocks[rows].max())
        self.page_table[:, :n, :max_blocks] = batch.block_table[:, rows, :max_blocks]
        md = AttentionMetadata(slot_mapping=slots, token_positions=token_positions, token_seqs=token_seqs,
                               kv_lens=kv_lens, cu_q_lens=query_start, page_indices=self.page_table.copy(),
                               num_seqs=np.array([n], np.int32))
        return StepInputs(rows=rows, num_scheduled=num_sched, query_start=query_start[:n + 1],
                          num_tokens=total, bucket=bucket, input_ids=input_ids, positions=pos, metadata=md)

"""InputBatch: the worker's persistent batch, updated from each step's diff.

Rows hold requests. Per-request state lives in preallocated numpy arrays (token ids,
block table, sampling parameters) so preparing a step's inputs is a handful of
vector operations, not a Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from piston.sampling_params import SamplingParams

if TYPE_CHECKING:  # the TPU runner reuses this batch without torch
    import torch


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)


class ScheduledTokens(NamedTuple):
    """A step's tokens flattened in batch-row order (what every runner builds inputs from)."""

    rows: np.ndarray  # [num_reqs] batch rows, ascending
    num_scheduled: np.ndarray  # [num_reqs] tokens each request computes this step
    cu_num_scheduled: np.ndarray  # [num_reqs] cumulative sum of num_scheduled
    num_computed: np.ndarray  # [num_reqs] tokens computed before this step
    req_idx: np.ndarray  # [num_tokens] which request (0..num_reqs-1) each token belongs to
    positions: np.ndarray  # [num_tokens] each token's position in its sequence
    token_rows: np.ndarray  # [num_tokens] each token's batch row
    block_numbers: np.ndarray  # [num_tokens] the KV block each token's K/V goes to

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.req_ids: list[str | None] = []
        self.states: list[CachedRequestState | None] = []
        self.req_id_to_row: dict[str, int] = {}

    @property
    def num_reqs(self) -> int:
        return len(self.req_id_to_row)

    def add_request(self, state: CachedRequestState, output_token_ids: list[int],
                    block_ids: list[int], num_computed_tokens: int) -> int:
        """Place a request in the first free row; returns the row."""
        if None in self.req_ids:
            row = self.req_ids.index(None)
        else:
            row = len(self.req_ids)
            if row >= self.max_num_reqs:
                raise RuntimeError(f"InputBatch is full ({self.max_num_reqs} requests).")
            self.req_ids.append(None)
            self.states.append(None)
        self.req_ids[row] = state.req_id
        self.states[row] = state
        self.req_id_to_row[state.req_id] = row
        tokens = state.prompt_token_ids + output_token_ids
        state.output_token_ids = list(output_token_ids)
        self.token_ids[row, :len(tokens)] = tokens
        self.num_tokens[row] = len(tokens)
        self.num_prompt_tokens[row] = len(state.prompt_token_ids)
        self.num_computed_tokens[row] = num_computed_tokens
        self.num_blocks[row] = 0
        self.append_block_ids(row, block_ids)
        p = state.sampling_params
        self.temperature[row] = 0.0 if p.greedy else p.temperature
        self.top_p[row] = p.top_p
        self.top_k[row] = p.top_k
        self.min_p[row] = p.min_p
        self.presence_penalty[row] = p.presence_penalty
        self.frequency_penalty[row] = p.frequency_penalty
        self.repetition_penalty[row] = p.repetition_penalty
        return row

    def remove_request(self, req_id: str) -> None:
        row = self.req_id_to_row.pop(req_id, None)
        if row is not None:
            self.req_ids[row] = None
            self.states[row] = None

    def condense(self) -> None:
        """Move the last requests into holes so rows 0..num_reqs-1 are all occupied."""
        n = self.num_reqs
        holes = [i for i in range(n) if self.req_ids[i] is None]
        for hole in holes:
            last = len(self.req_ids) - 1
            while self.req_ids[last] is None:
                last -= 1
            self._move(last, hole)
        del self.req_ids[n:]
        del self.states[n:]

    def _move(self, src: int, dst: int) -> None:
        for arr in (self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens,
                    self.num_blocks, self.temperature, self.top_p, self.top_k, self.min_p,
                    self.presence_penalty, self.frequency_penalty, self.repetition_penalty):
            arr[dst] = arr[src]
        self.token_ids[dst, :self.num_tokens[src]] = self.token_ids[src, :self.num_tokens[src]]
        self.block_table[dst, :self.num_blocks[src]] = self.block_table[src, :self.num_blocks[src]]
        req_id = self.req_ids[src]
        self.req_ids[dst], self.states[dst] = req_id, self.states[src]
        self.req_ids[src] = self.states[src] = None
        self.req_id_to_row[req_id] = dst

    def append_block_ids(self, row: int, block_ids: list[int]) -> None:
        start = self.num_blocks[row]
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def append_token(self, row: int, token_id: int) -> None:
        self.token_ids[row, self.num_tokens[row]] = token_id
        self.num_tokens[row] += 1
        self.states[row].output_token_ids.append(token_id)

    def schedule(self, num_scheduled_tokens: dict[str, int], block_size: int) -> ScheduledTokens:
        """Flatten ``{request_id: num_tokens}`` into per-token arrays, requests in batch order
        (so the sampler's rows stay stable from step to step)."""
        rows = np.fromiter((self.req_id_to_row[r] for r in num_scheduled_tokens),
                           dtype=np.int64, count=len(num_scheduled_tokens))
        num_sched = np.fromiter(num_scheduled_tokens.values(), dtype=np.int64, count=len(rows))
        order = np.argsort(rows, kind="stable")
        rows, num_sched = rows[order], num_sched[order]
        cu = np.cumsum(num_sched)
        req_idx = np.repeat(np.arange(len(rows)), num_sched)
        computed = self.num_computed_tokens[rows]
        offsets = np.arange(int(num_sched.sum())) - np.repeat(cu - num_sched, num_sched)
        positions = computed[req_idx] + offsets
        token_rows = rows[req_idx]
        block_numbers = self.block_table[token_rows, positions // block_size]
        return ScheduledTokens(rows, num_sched, cu, computed, req_idx, positions, token_rows, block_numbers)

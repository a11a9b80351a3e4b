"""InputBatch: a runner's persistent batch, updated from each step's diff.

Rows hold requests. Per-request state lives in preallocated numpy arrays (token ids,
block table, sampling parameters), so preparing a step is a handful of vector operations,
not a Python loop over tokens. Every model runner (torch and JAX) uses this same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from piston.step.sampling_params import SamplingParams
from piston.step.scheduler_output import NewRequestData, SchedulerOutput


@dataclass
class RunnerRequestState:
    """What a runner keeps about a request the scheduler has sent it, between steps."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    # Platform state tied to the request (the torch runner's seeded generator).
    generator: Any = None
    # Speculative decoding by a draft model: the leading tokens whose KV the draft model
    # holds (piston.step.draft_proposer).
    draft_num_computed: int = 0
    # ... and the drafts it wrote KV for after them, at the last proposal.
    drafted: tuple[int, ...] = ()
    # The LoRA adapter it runs with (None: the base model).
    lora_request: Any = None


class ScheduledTokens(NamedTuple):
    """A step's tokens flattened in batch-row order (what every runner builds inputs from)."""

    rows: np.ndarray  # [num_reqs] batch rows, ascending
    num_scheduled: np.ndarray  # [num_reqs] tokens each request computes this step
    cu_num_scheduled: np.ndarray  # [num_reqs] cumulative sum of num_scheduled
    num_computed: np.ndarray  # [num_reqs] tokens computed before this step
    req_idx: np.ndarray  # [num_tokens] which request (0..num_reqs-1) each token belongs to
    positions: np.ndarray  # [num_tokens] each token's position in its sequence
    token_rows: np.ndarray  # [num_tokens] each token's batch row
    # [num_groups, num_tokens] the KV block each token's K/V goes to, in each group's block
    # table (one group unless the model is hybrid: piston.step.kv_cache_layout)
    block_numbers: np.ndarray
    # Requests (indices into ``rows``) that reach the end of their tokens and sample.
    sampling: np.ndarray
    # [len(sampling)] the flattened token index whose hidden state each of them samples from.
    logits_indices: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def num_reqs(self) -> int:
        return len(self.rows)

    @property
    def sample_rows(self) -> np.ndarray:
        """The batch rows that sample this step, in batch order."""
        return self.rows[self.sampling]

    @property
    def query_start_loc(self) -> np.ndarray:
        """[num_reqs + 1] int32: where each request's tokens start in the flattened step."""
        qsl = np.zeros(len(self.rows) + 1, dtype=np.int32)
        qsl[1:] = self.cu_num_scheduled
        return qsl


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int, num_groups: int = 1) -> None:
        self.max_num_reqs = max_num_reqs
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        # One block table per KV cache group; a request has as many places in each (released
        # ones hold a block no query reads), so ``num_blocks`` serves every group.
        self.block_table = np.zeros((num_groups, max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.min_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_logprobs = np.full(max_num_reqs, -1, dtype=np.int64)  # -1: no logprobs
        self.num_prompt_logprobs = np.full(max_num_reqs, -1, dtype=np.int64)  # -1: none
        self.seed = np.zeros(max_num_reqs, dtype=np.uint64)  # modulo 2**64
        self.seeded = np.zeros(max_num_reqs, dtype=bool)
        self.req_ids: list[str | None] = []
        self.states: list[RunnerRequestState | None] = []
        self.req_id_to_row: dict[str, int] = {}

    @property
    def num_reqs(self) -> int:
        return len(self.req_id_to_row)

    def num_output_tokens(self, rows: np.ndarray) -> np.ndarray:
        """Tokens generated so far by the requests in ``rows``."""
        return self.num_tokens[rows] - self.num_prompt_tokens[rows]

    # ----- the scheduler's diff -------------------------------------------------------

    def apply_diff(self, scheduler_output: SchedulerOutput) -> list[RunnerRequestState]:
        """Forget finished requests, advance running ones, add new ones; returns the new
        requests' states (a runner may attach platform state to them)."""
        for req_id in scheduler_output.finished_req_ids:
            self.remove_request(req_id)
        running = scheduler_output.scheduled_running_reqs
        for req_id, new_blocks, computed in zip(running.req_ids, running.new_block_ids,
                                                running.num_computed_tokens):
            row = self.req_id_to_row[req_id]
            self.append_block_ids(row, new_blocks)
            self.num_computed_tokens[row] = computed
        self.condense()
        return [self.add_request(new) for new in scheduler_output.scheduled_new_reqs]

    def add_request(self, new: NewRequestData) -> RunnerRequestState:
        """Place a new (or resumed) request in the first free row."""
        state = RunnerRequestState(new.req_id, new.prompt_token_ids, new.sampling_params, new.eos_token_id,
                                   draft_num_computed=new.num_computed_tokens, lora_request=new.lora_request)
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
        num_prompt, num_out = len(new.prompt_token_ids), len(new.output_token_ids)
        self.token_ids[row, :num_prompt] = new.prompt_token_ids
        self.token_ids[row, num_prompt:num_prompt + num_out] = new.output_token_ids
        self.num_tokens[row] = num_prompt + num_out
        self.num_prompt_tokens[row] = num_prompt
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_blocks[row] = 0
        self.append_block_ids(row, new.block_ids)
        p = state.sampling_params
        self.temperature[row] = 0.0 if p.greedy else p.temperature
        self.top_p[row] = p.top_p
        self.top_k[row] = p.top_k
        self.min_p[row] = p.min_p
        self.presence_penalty[row] = p.presence_penalty
        self.frequency_penalty[row] = p.frequency_penalty
        self.repetition_penalty[row] = p.repetition_penalty
        self.min_tokens[row] = p.min_tokens
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.num_prompt_logprobs[row] = -1 if p.prompt_logprobs is None else p.prompt_logprobs
        self.seeded[row] = p.seed is not None
        self.seed[row] = 0 if p.seed is None else p.seed % 2**64
        return state

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
                    self.presence_penalty, self.frequency_penalty, self.repetition_penalty,
                    self.min_tokens, self.num_logprobs, self.num_prompt_logprobs, self.seed, self.seeded):
            arr[dst] = arr[src]
        self.token_ids[dst, :self.num_tokens[src]] = self.token_ids[src, :self.num_tokens[src]]
        self.block_table[:, dst, :self.num_blocks[src]] = self.block_table[:, src, :self.num_blocks[src]]
        req_id = self.req_ids[src]
        self.req_ids[dst], self.states[dst] = req_id, self.states[src]
        self.req_ids[src] = self.states[src] = None
        self.req_id_to_row[req_id] = dst

    def append_block_ids(self, row: int, block_ids: list[list[int]]) -> None:
        """Append each group's new blocks (as many in every group) to the row's tables."""
        start = self.num_blocks[row]
        n = len(block_ids[0]) if block_ids else 0
        for group, ids in enumerate(block_ids):
            self.block_table[group, row, start:start + n] = ids
        self.num_blocks[row] = start + n

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Append one sampled token to each of ``rows`` (distinct rows)."""
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1

    def append_token_lists(self, rows: np.ndarray, token_ids: list[list[int]]) -> None:
        """Append ``token_ids[i]`` (one or more tokens) to row ``rows[i]``."""
        for row, ids in zip(rows.tolist(), token_ids):
            n = int(self.num_tokens[row])
            self.token_ids[row, n:n + len(ids)] = ids
            self.num_tokens[row] = n + len(ids)

    def write_drafts(self, spec: dict[str, list[int]]) -> None:
        """Place each request's draft tokens after its last token, where the step's inputs
        are read from; they are not counted in ``num_tokens`` (the sampler decides which
        of them become tokens)."""
        for req_id, drafts in spec.items():
            row = self.req_id_to_row[req_id]
            n = int(self.num_tokens[row])
            self.token_ids[row, n:n + len(drafts)] = drafts

    # ----- one step's tokens ------------------------------------------------------------

    def schedule(self, num_scheduled_tokens: dict[str, int], block_size: int) -> ScheduledTokens:
        """Flatten ``{request_id: num_tokens}`` into per-token arrays, requests in batch order
        (so the sampler's rows stay stable from step to step), and pick the requests that
        sample: those whose tokens this step reach the end of everything they hold."""
        rows = np.fromiter((self.req_id_to_row[r] for r in num_scheduled_tokens),
                           dtype=np.int64, count=len(num_scheduled_tokens))
        num_sched = np.fromiter(num_scheduled_tokens.values(), dtype=np.int64, count=len(rows))
        order = np.argsort(rows, kind="stable")
        rows, num_sched = rows[order], num_sched[order]
        computed = self.num_computed_tokens[rows]
        return self.schedule_spans(rows, computed, num_sched, computed + num_sched >= self.num_tokens[rows],
                                   block_size)

    def schedule_spans(self, rows: np.ndarray, start: np.ndarray, count: np.ndarray, sample: np.ndarray,
                       block_size: int) -> ScheduledTokens:
        """ScheduledTokens for tokens ``start[i]`` to ``start[i] + count[i]`` of each of
        ``rows`` (ascending, distinct; their ids are read from ``token_ids``), where the
        rows with ``sample[i]`` give a hidden state at their last token."""
        cu = np.cumsum(count)
        req_idx = np.repeat(np.arange(len(rows)), count)
        offsets = np.arange(int(cu[-1]) if len(cu) else 0) - np.repeat(cu - count, count)
        positions = start[req_idx] + offsets
        token_rows = rows[req_idx]
        block_numbers = self.block_table[:, token_rows, positions // block_size]
        sampling = np.flatnonzero(sample)
        logits_indices = cu[sampling] - 1
        return ScheduledTokens(rows, count, cu, start, req_idx, positions, token_rows, block_numbers,
                               sampling, logits_indices)

    def padded_token_ids(self, rows: np.ndarray, outputs: bool, pad: int, extra: np.ndarray | None = None
                         ) -> np.ndarray:
        """[len(rows), longest] prompt (``outputs=False``) or output token ids of ``rows``,
        padded with ``pad``; ``extra`` [len(rows)]: that many draft tokens after each row's
        tokens count as output too (speculative decoding)."""
        start = self.num_prompt_tokens[rows] if outputs else np.zeros(len(rows), np.int64)
        stop = self.num_tokens[rows] if outputs else self.num_prompt_tokens[rows]
        if outputs and extra is not None:
            stop = stop + extra
        lengths = stop - start
        width = int(lengths.max()) if len(rows) else 0
        cols = np.arange(width)
        valid = cols[None, :] < lengths[:, None]
        index = np.where(valid, start[:, None] + cols[None, :], 0)
        return np.where(valid, self.token_ids[rows[:, None], index], pad)

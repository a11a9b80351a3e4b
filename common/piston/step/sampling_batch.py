"""SamplingBatch: the sampling parameters of one step's sampled rows, as numpy arrays.

Built once per step from the InputBatch with vector operations; each platform's sampler
turns it into its own tensors (torch on CPU and CUDA, JAX on TPU). Row i is the i-th
request that samples this step, in batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from piston.step.input_batch import InputBatch


@dataclass
class SamplingBatch:
    rows: np.ndarray  # [B] the batch rows that sample
    temperature: np.ndarray  # [B] float32; 0.0 on greedy rows
    top_p: np.ndarray  # [B] float32; 1.0 = off
    top_k: np.ndarray  # [B] int64; vocab_size = off
    min_p: np.ndarray  # [B] float32; 0.0 = off
    presence_penalty: np.ndarray  # [B] float32; 0 = off
    frequency_penalty: np.ndarray  # [B] float32; 0 = off
    repetition_penalty: np.ndarray  # [B] float32; 1 = off
    seeds: np.ndarray  # [B] uint64: each request's sampling seed modulo 2**64 (0 when unseeded)
    seeded: np.ndarray  # [B] bool: the request gave a seed
    num_output_tokens: np.ndarray  # [B] int64: tokens each request generated so far
    # row -> token ids to forbid (eos and stop_token_ids) while min_tokens are not out yet.
    min_tokens: dict[int, list[int]]
    # Largest ``logprobs`` k asked for in the batch; None when no row wants logprobs.
    max_num_logprobs: int | None
    # [B, ceil(vocab / 32)] int32 packed masks of the tokens each row may sample (all bits set
    # on unconstrained rows); None when no row is constrained.
    allowed_bitmask: np.ndarray | None = None
    # Speculative decoding (``expand``): [B] int64, how many draft tokens, written after a
    # row's tokens in the InputBatch, count as its output so far (for penalties); None: none.
    num_draft_outputs: np.ndarray | None = None

    def expand(self, request: np.ndarray, offset: np.ndarray, batch: InputBatch) -> "SamplingBatch":
        """One row per speculative position: position t samples for row ``request[t]`` after
        ``offset[t]`` of its drafts were accepted, so those drafts are part of its output
        (penalties, min_tokens)."""
        num_out = self.num_output_tokens[request] + offset
        min_tokens = {}
        for t in np.flatnonzero(num_out < batch.min_tokens[self.rows[request]]).tolist():
            ids = self.min_tokens.get(int(request[t]))
            if ids:
                min_tokens[t] = ids
        return SamplingBatch(
            rows=self.rows[request], temperature=self.temperature[request], top_p=self.top_p[request],
            top_k=self.top_k[request], min_p=self.min_p[request],
            presence_penalty=self.presence_penalty[request], frequency_penalty=self.frequency_penalty[request],
            repetition_penalty=self.repetition_penalty[request], seeds=self.seeds[request],
            seeded=self.seeded[request], num_output_tokens=num_out, min_tokens=min_tokens,
            max_num_logprobs=self.max_num_logprobs,
            allowed_bitmask=None if self.allowed_bitmask is None else self.allowed_bitmask[request],
            num_draft_outputs=offset)

    def slice(self, start: int, stop: int) -> "SamplingBatch":
        """Rows ``start:stop`` (a platform samples a long batch in pieces)."""
        part = slice(start, stop)

        def cut(a):
            return None if a is None else a[part]

        return SamplingBatch(
            rows=self.rows[part], temperature=self.temperature[part], top_p=self.top_p[part], top_k=self.top_k[part],
            min_p=self.min_p[part], presence_penalty=self.presence_penalty[part],
            frequency_penalty=self.frequency_penalty[part], repetition_penalty=self.repetition_penalty[part],
            seeds=self.seeds[part], seeded=self.seeded[part], num_output_tokens=self.num_output_tokens[part],
            min_tokens={i - start: ids for i, ids in self.min_tokens.items() if start <= i < stop},
            max_num_logprobs=self.max_num_logprobs, allowed_bitmask=cut(self.allowed_bitmask),
            num_draft_outputs=cut(self.num_draft_outputs))

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0.0).all())

    @property
    def all_random(self) -> bool:
        return bool((self.temperature != 0.0).all())

    @property
    def uses_top_p(self) -> bool:
        return bool((self.top_p < 1.0).any())

    @property
    def uses_min_p(self) -> bool:
        return bool((self.min_p > 0.0).any())

    @property
    def no_penalties(self) -> bool:
        return bool((self.presence_penalty == 0).all() and (self.frequency_penalty == 0).all()
                    and (self.repetition_penalty == 1).all())

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of its raw logits: greedy, no logprobs, penalties,
        min_tokens or grammar. Only the argmax is then needed, not the logits."""
        return (self.all_greedy and self.max_num_logprobs is None and not self.min_tokens and self.no_penalties
                and (self.allowed_bitmask is None or bool((self.allowed_bitmask == -1).all())))

    @classmethod
    def from_batch(cls, batch: InputBatch, rows: np.ndarray, vocab_size: int,
                   grammar_req_ids: list[str] = (), grammar_bitmask: bytes = b"") -> "SamplingBatch":
        num_out = batch.num_output_tokens(rows)
        num_logprobs = batch.num_logprobs[rows]
        k_max = int(num_logprobs.max()) if len(rows) and num_logprobs.max() >= 0 else None
        min_tokens: dict[int, list[int]] = {}
        for i in np.flatnonzero(num_out < batch.min_tokens[rows]).tolist():
            state = batch.states[int(rows[i])]
            stop_ids = set(state.sampling_params.stop_token_ids or ())
            if state.eos_token_id is not None and not state.sampling_params.ignore_eos:
                stop_ids.add(state.eos_token_id)
            stop_ids = sorted(t for t in stop_ids if t < vocab_size)
            if stop_ids:
                min_tokens[i] = stop_ids
        allowed = None
        if grammar_req_ids:
            masks = np.frombuffer(grammar_bitmask, dtype=np.int32).reshape(len(grammar_req_ids), -1)
            index = {req_id: i for i, req_id in enumerate(grammar_req_ids)}
            which = np.array([index.get(batch.req_ids[r], -1) for r in rows.tolist()])
            allowed = np.full((len(rows), masks.shape[1]), -1, dtype=np.int32)
            allowed[which >= 0] = masks[which[which >= 0]]
        top_k = batch.top_k[rows]
        return cls(rows=rows, temperature=batch.temperature[rows], top_p=batch.top_p[rows],
                   top_k=np.where(top_k == 0, vocab_size, top_k), min_p=batch.min_p[rows],
                   presence_penalty=batch.presence_penalty[rows],
                   frequency_penalty=batch.frequency_penalty[rows],
                   repetition_penalty=batch.repetition_penalty[rows],
                   seeds=batch.seed[rows], seeded=batch.seeded[rows], num_output_tokens=num_out,
                   min_tokens=min_tokens, max_num_logprobs=k_max, allowed_bitmask=allowed)

"""SpecDecodeBatch: where a step's draft tokens sit, for the rejection sampler.

Speculative decoding checks, in one forward pass, a request's last token followed by the
``k`` tokens a proposer drafted. The target's hidden states at those ``k + 1`` positions
give ``k + 1`` next-token distributions: position ``j`` decides whether draft ``j`` is
what the target would sample there, and the position after the last accepted draft gives
one more token (the correction, or a bonus when every draft was accepted).

This module lays the positions out, in numpy, the same for every platform. A request
without drafts has one position (its ordinary sample). Row ``i`` is the ``i``-th sampled
request of the step, in batch order, as in SamplingBatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from piston.step.input_batch import InputBatch, ScheduledTokens


@dataclass
class SpecDecodeBatch:
    num_draft: np.ndarray  # [B] int64: drafts checked per sampled request (0: none)
    draft_token_ids: np.ndarray  # [sum(num_draft)] int64, request after request
    logits_indices: np.ndarray  # [T = B + sum(num_draft)]: the hidden row of each position
    cu_num_positions: np.ndarray  # [B + 1] int64: where each request's positions start
    position_request: np.ndarray  # [T] int64: which request (0..B-1) a position belongs to
    position_offset: np.ndarray  # [T] int64: j, the position's index within its request

    @property
    def num_positions(self) -> int:
        return len(self.logits_indices)

    @property
    def is_draft(self) -> np.ndarray:
        """[T] bool: the position checks a draft (the last position of a request does not)."""
        return self.position_offset < self.num_draft[self.position_request]

    @property
    def draft_at_position(self) -> np.ndarray:
        """[T] int64: the draft each position checks (-1 on the last position of a request)."""
        out = np.full(self.num_positions, -1, dtype=np.int64)
        out[self.is_draft] = self.draft_token_ids
        return out

    @classmethod
    def build(cls, batch: InputBatch, scheduled: ScheduledTokens, spec: dict[str, list[int]]) -> "SpecDecodeBatch":
        rows = scheduled.sample_rows
        num_draft = np.fromiter((len(spec.get(batch.req_ids[r], ())) for r in rows.tolist()),
                                dtype=np.int64, count=len(rows))
        drafts = [spec[batch.req_ids[r]] for r, n in zip(rows.tolist(), num_draft.tolist()) if n]
        draft_ids = np.concatenate(drafts).astype(np.int64) if drafts else np.zeros(0, np.int64)
        num_pos = num_draft + 1
        cu = np.zeros(len(rows) + 1, dtype=np.int64)
        cu[1:] = np.cumsum(num_pos)
        position_request = np.repeat(np.arange(len(rows)), num_pos)
        position_offset = np.arange(int(cu[-1])) - cu[position_request]
        # The request's last scheduled token is its last draft; its positions end there.
        first = scheduled.logits_indices - num_draft
        logits_indices = first[position_request] + position_offset
        return cls(num_draft, draft_ids, logits_indices, cu, position_request, position_offset)

    def count_accepted(self, greedy: np.ndarray, argmax: np.ndarray, p_draft: np.ndarray,
                       uniform: np.ndarray) -> np.ndarray:
        """The rejection rule on per-position decisions a sampler computed (all [T]): a
        greedy position (``greedy``) accepts its draft when it equals the ``argmax`` of its
        processed logits, a sampled one when ``uniform`` < ``p_draft`` (the probability of
        the draft under its processed distribution). Returns each request's leading run of
        accepted drafts [B]; its next token comes from position ``final_positions()``: the
        argmax there (greedy), or a sample of the residual (p without the rejected draft)
        or, past the last draft, of p."""
        accept = self.is_draft & np.where(greedy, argmax == self.draft_at_position, uniform < p_draft)
        offsets = np.where(accept, np.iinfo(np.int64).max, self.position_offset)
        return np.minimum.reduceat(offsets, self.cu_num_positions[:-1])

    def final_positions(self, num_accepted: np.ndarray) -> np.ndarray:
        """[B] the position after each request's last accepted draft."""
        return self.cu_num_positions[:-1] + num_accepted

    def output_positions(self, num_accepted: np.ndarray) -> np.ndarray:
        """The positions whose distributions produced the returned tokens, in order:
        ``cu[i]`` to ``cu[i] + num_accepted[i]`` for each request i."""
        counts = num_accepted + 1
        return np.repeat(self.cu_num_positions[:-1], counts) + (
            np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))

    def accepted_tokens(self, num_accepted: np.ndarray, final: np.ndarray) -> list[list[int]]:
        """Each request's output: its first ``num_accepted[i]`` drafts and ``final[i]``."""
        out = []
        starts = self.cu_num_positions[:-1] - np.arange(len(self.num_draft))  # draft offsets
        drafts = self.draft_token_ids.tolist()
        for i, (a, tok) in enumerate(zip(num_accepted.tolist(), final.tolist())):
            s = int(starts[i])
            out.append(drafts[s:s + a] + [tok])
        return out

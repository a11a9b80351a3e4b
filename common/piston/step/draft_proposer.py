"""DraftModelProposer: drafts from a smaller model with the target's vocabulary.

The platform's runner holds the draft model, its weights and its KV cache layers. Those
layers live in the target's blocks (a block holds the target's layers and the draft's), so
the scheduler's block tables serve both and prefix caching covers both. This module decides,
in numpy and the same on every platform, which tokens each of the draft model's passes
computes; the runner's ``draft_forward(scheduled)`` runs one pass and returns the greedy
token at each sampling row's last position.

After a step, a request that sampled holds ``N`` tokens; the draft model holds the KV of
its first ``state.draft_num_computed`` (``v``) tokens.

1. Pass 1 (catch-up): tokens ``v .. N - 1`` of every proposing request, and the tokens the
   step computed of requests in the middle of their prompt (so a long prompt's draft KV is
   computed chunk by chunk, with the target's). The last token's hidden state gives draft 1.
   Passes are cut at ``max_num_batched_tokens`` tokens.
2. Passes 2..k: draft ``j - 1`` at position ``N + j - 2``, one token per request, gives
   draft ``j``.

The drafts' own KV (positions ``N .. N + k - 2``) stays in the cache: at the next step, the
drafts the target accepted are tokens whose draft KV is already right, so catch-up starts
after them. Those positions may lie past the step's scheduled tokens: the scheduler
reserves ``num_speculative_tokens`` lookahead slots when blocks are spare, and a request
drafts only as far as its blocks reach (and ``max_model_len`` allows).

Draft KV may be stale where the draft model did not run (steps above
``disable_by_batch_size``, prefix-cache hits on blocks computed then): that lowers the
acceptance rate, never the output, which the rejection sampler keeps exact.

An EAGLE head (method "eagle") reads, at position ``p``, the token at ``p + 1`` and the
target's hidden state at ``p``. Those hidden states exist only in the step that computed
them, so its pass 1 covers exactly the positions the target computed this step whose next
token is known: up to ``N - 2`` for a request that sampled (the target's states past its
last accepted draft were computed from rejected drafts), every scheduled one for a prompt
chunk. Draft 1 comes from position ``N - 2``; pass ``j`` then runs position ``N + j - 3``
with the token at ``N + j - 2`` (draft ``j - 1``) and the head's own last output as its
feature. Nothing is caught up later: positions computed in steps without drafting keep
stale head KV (a lower acceptance rate only).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from piston.step.config import SpeculativeConfig
from piston.step.input_batch import InputBatch, ScheduledTokens


class DraftModelProposer:
    # ModelRunner._propose passes the step's ScheduledTokens (for the catch-up of prompt chunks).
    wants_scheduled = True

    def __init__(self, config: SpeculativeConfig, draft_forward: Callable[..., np.ndarray],
                 block_size: int, max_model_len: int, max_tokens_per_pass: int) -> None:
        self.k = config.num_speculative_tokens
        self.eagle = config.is_eagle
        self.draft_forward = draft_forward
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_tokens_per_pass = max(max_tokens_per_pass, 1)

    def propose(self, batch: InputBatch, rows: np.ndarray, scheduled: ScheduledTokens | None = None,
                hidden: Any = None) -> list[list[int]]:
        """Up to ``k`` greedy drafts for each of ``rows`` (requests that sampled this step),
        after catching the draft model's KV up with everything the target computed
        (``hidden``: the target's hidden states of the step, for an EAGLE head)."""
        if self.eagle:
            return self._propose_eagle(batch, rows, scheduled, hidden)
        proposing = {int(r) for r in rows.tolist()}
        spans: dict[int, tuple[int, int, int]] = {}  # row -> (start, end, drafts to make)
        if scheduled is not None:  # prompt chunks that did not sample: catch up only
            sampled = set(scheduled.sample_rows.tolist())
            for r, computed, n in zip(scheduled.rows.tolist(), scheduled.num_computed.tolist(),
                                      scheduled.num_scheduled.tolist()):
                state = batch.states[r]
                if r not in sampled and state.sampling_params.structured_outputs is None:
                    spans[r] = (state.draft_num_computed, min(computed + n, self._room(batch, r)), 0)
        for r in proposing:
            n = int(batch.num_tokens[r])
            room = self._room(batch, r)
            num_drafts = max(min(self.k, self.max_model_len - n, room - n + 1), 0)
            end = min(n, room)
            spans[r] = (self._valid_draft_kv(batch, r, end, num_drafts > 0), end, num_drafts)
        spans = {r: s for r, s in spans.items() if s[1] > s[0]}
        if not spans:
            return [[] for _ in range(len(rows))]

        drafts: dict[int, list[int]] = {r: [] for r, s in spans.items() if s[2] > 0}
        for piece in self._catch_up_passes(spans):
            p_rows, p_start, p_count, p_sample = (np.array(c, dtype=np.int64) for c in zip(*piece))
            sched = batch.schedule_spans(p_rows, p_start, p_count, p_sample.astype(bool), self.block_size)
            for r, tok in zip(p_rows[p_sample.astype(bool)].tolist(), self.draft_forward(sched).tolist()):
                drafts[r].append(int(tok))
        for j in range(2, self.k + 1):  # draft j - 1 at position n + j - 2 gives draft j
            active = np.array(sorted(r for r, d in drafts.items() if spans[r][2] >= j), dtype=np.int64)
            if not len(active):
                break
            pos = batch.num_tokens[active] + j - 2
            batch.token_ids[active, pos] = [drafts[r][-1] for r in active.tolist()]
            sched = batch.schedule_spans(active, pos, np.ones(len(active), np.int64), np.ones(len(active), bool),
                                         self.block_size)
            for r, tok in zip(active.tolist(), self.draft_forward(sched).tolist()):
                drafts[r].append(int(tok))

        for r, (_, end, num_drafts) in spans.items():
            state = batch.states[r]
            state.draft_num_computed = end
            # Drafts 1..k-1 have their draft KV at positions end, end + 1, ...
            state.drafted = tuple(drafts[r][:num_drafts - 1]) if num_drafts > 1 else ()
        return [drafts.get(r, []) for r in rows.tolist()]

    def _propose_eagle(self, batch: InputBatch, rows: np.ndarray, scheduled: ScheduledTokens,
                       hidden: Any) -> list[list[int]]:
        proposing = set(rows.tolist())
        sampled = set(scheduled.sample_rows.tolist())
        p_rows, p_start, p_count, p_drafts, p_hidden = [], [], [], [], []
        qsl = scheduled.query_start_loc
        for i, (r, c, n) in enumerate(zip(scheduled.rows.tolist(), scheduled.num_computed.tolist(),
                                          scheduled.num_scheduled.tolist())):
            if batch.states[r].sampling_params.structured_outputs is not None:
                continue
            num_drafts, end = 0, c + n  # a prompt chunk: the token after each position is known
            if r in sampled:
                if r not in proposing:
                    continue
                total = int(batch.num_tokens[r])
                end = total - 1  # the target's states up to the last accepted draft
                num_drafts = max(min(self.k, self.max_model_len - total, self._room(batch, r) - total + 2), 0)
            if end > c:
                p_rows.append(r)
                p_start.append(c)
                p_count.append(end - c)
                p_drafts.append(num_drafts)
                p_hidden.append(np.arange(qsl[i], qsl[i] + end - c))
        drafts: dict[int, list[int]] = {}
        if not p_rows:
            return [[] for _ in range(len(rows))]
        num_drafts = dict(zip(p_rows, p_drafts))
        sample = np.array(p_drafts) > 0
        sched = batch.schedule_spans(np.array(p_rows, np.int64), np.array(p_start, np.int64),
                                     np.array(p_count, np.int64), sample, self.block_size)
        last = np.array(p_rows, np.int64)[sample]  # the rows of the head's last outputs, in order
        for r, tok in zip(last.tolist(), self.draft_forward(sched, hidden, np.concatenate(p_hidden)).tolist()):
            drafts[r] = [int(tok)]
        for j in range(2, self.k + 1):  # position n + j - 3 reads draft j - 1 (at n + j - 2)
            active = np.array(sorted(r for r in drafts if num_drafts[r] >= j), dtype=np.int64)
            if not len(active):
                break
            batch.token_ids[active, batch.num_tokens[active] + j - 2] = [drafts[r][-1] for r in active.tolist()]
            sched = batch.schedule_spans(active, batch.num_tokens[active] + j - 3, np.ones(len(active), np.int64),
                                         np.ones(len(active), bool), self.block_size)
            feature_rows = np.searchsorted(last, active)
            for r, tok in zip(active.tolist(), self.draft_forward(sched, None, feature_rows).tolist()):
                drafts[r].append(int(tok))
            last = active
        return [drafts.get(r, []) for r in rows.tolist()]

    def _room(self, batch: InputBatch, row: int) -> int:
        """How many positions the row's blocks (and max_model_len) give the draft's KV."""
        return min(int(batch.num_blocks[row]) * self.block_size, self.max_model_len)

    @staticmethod
    def _valid_draft_kv(batch: InputBatch, row: int, end: int, recompute_last: bool) -> int:
        """Where the row's catch-up starts: after ``draft_num_computed`` tokens and the drafts
        of the last proposal that became tokens (their draft KV was written while drafting;
        only tokens below ``end`` count, and with ``recompute_last`` the last token is run
        again for its hidden state)."""
        state = batch.states[row]
        start = state.draft_num_computed
        if state.drafted:
            have = batch.token_ids[row, start:min(start + len(state.drafted), end)]
            same = have == np.asarray(state.drafted[:len(have)], dtype=np.int64)
            start += int(len(same) if same.all() else np.argmin(same))
        return max(min(start, end - 1 if recompute_last else end), 0)

    def _catch_up_passes(self, spans: dict[int, tuple[int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
        """Pass 1's (row, start, count, samples) pieces, rows ascending, cut into passes of
        at most ``max_tokens_per_pass`` tokens (a long span continues in the next pass; only
        its last piece samples)."""
        passes: list[list[tuple[int, int, int, int]]] = [[]]
        room = self.max_tokens_per_pass
        for r in sorted(spans):
            start, end, num_drafts = spans[r]
            while start < end:
                if room == 0:
                    passes.append([])
                    room = self.max_tokens_per_pass
                n = min(end - start, room)
                passes[-1].append((r, start, n, int(start + n == end and num_drafts > 0)))
                start += n
                room -= n
        return [p for p in passes if p]

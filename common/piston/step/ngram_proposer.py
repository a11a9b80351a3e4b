"""NgramProposer: speculative drafts by prompt lookup, in numpy, with no model.

When the last ``n`` tokens of a sequence occurred earlier in it (the prompt or the output
so far), the tokens that followed that earlier occurrence are a good guess for what comes
next: text that quotes, edits or summarises its input repeats long runs of it. The longest
``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min`` that matches wins; among its
matches the latest one with a full run of ``k`` tokens after it, else the latest one.
"""

from __future__ import annotations

import numpy as np

from piston.step.config import SpeculativeConfig
from piston.step.input_batch import InputBatch


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, batch: InputBatch, rows: np.ndarray) -> list[list[int]]:
        """Up to ``k`` drafts for each of ``rows`` (an empty list where nothing matches)."""
        return [self.propose_one(batch.token_ids[r, :batch.num_tokens[r]]) for r in rows.tolist()]

    def propose_one(self, tokens: np.ndarray) -> list[int]:
        length = len(tokens)
        if length < self.min_n + 1:
            return []
        # Candidate ends of an earlier occurrence: where the last token occurred before.
        ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])
        if not len(ends):
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            cand = ends[ends >= n - 1]
            if not len(cand):
                continue
            back = np.arange(n - 1, -1, -1)
            windows = tokens[cand[:, None] - back[None, :]]
            match = cand[(windows == tokens[length - n:]).all(axis=1)]
            if len(match):
                full = match[match + self.k < length]
                end = int(full[-1] if len(full) else match[-1])
                return tokens[end + 1:end + 1 + self.k].tolist()
        return []

"""A test proposer (``speculative_config.method = "oracle_proposer:OracleProposer"``) that
drafts from known greedy continuations, so the tiny random models, which never repeat
themselves, still get drafts that are accepted. Every other draft run has its third draft
made wrong, so drafts are rejected in the middle of a run too.

PISTON_TEST_ORACLE names a JSON file: a list of [prompt token ids, continuation token ids].
"""

from __future__ import annotations

import json
import os


class OracleProposer:
    def __init__(self, config) -> None:
        self.k = config.num_speculative_tokens
        with open(os.environ["PISTON_TEST_ORACLE"]) as f:
            self.table = [(list(p), list(c)) for p, c in json.load(f)]
        self.runs = 0

    def propose(self, batch, rows) -> list[list[int]]:
        out = []
        for row in rows.tolist():
            tokens = batch.token_ids[row, :batch.num_tokens[row]].tolist()
            drafts: list[int] = []
            for prompt, continuation in self.table:
                n = len(prompt)
                if tokens[:n] == prompt and tokens[n:] == continuation[:len(tokens) - n]:
                    drafts = continuation[len(tokens) - n:len(tokens) - n + self.k]
                    break
            self.runs += 1
            if self.runs % 2 == 0 and len(drafts) >= 3:
                drafts[2] = drafts[2] + 1 if drafts[2] + 1 < 40000 else 5
            out.append(drafts)
        return out

"""A proposer whose drafts are always rejected, for measuring what checking drafts costs
when speculation does not pay (the worst case the platform's ``disable_by_batch_size``
guards against). Not for serving.

    PYTHONPATH=benchmarks piston bench throughput --dataset random --num-prompts 64 \\
        --speculative-config '{"method": "rejected_drafts:RejectedDrafts", "num_speculative_tokens": 4}'

Each request gets ``num_speculative_tokens`` drafts every step: the tokens after its last
one in id order, which a greedy model (practically) never picks.
"""

from __future__ import annotations


class RejectedDrafts:
    def __init__(self, config) -> None:
        self.k = config.num_speculative_tokens

    def propose(self, batch, rows) -> list[list[int]]:
        last = batch.token_ids[rows, batch.num_tokens[rows] - 1]
        return [[(int(t) + 1 + i) % 30000 for i in range(self.k)] for t in last.tolist()]

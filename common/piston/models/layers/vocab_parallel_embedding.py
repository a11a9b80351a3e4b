"""The token embedding and the LM head, split over the vocabulary.

Each rank holds ``ceil(vocab / tp)`` consecutive rows (the last rank's tail is zero
padding). The embedding looks up the ids in its range, zeroes the others and sums over
the ranks; the LM head computes its rows' logits and gathers them, so every rank ends
with the full ``[N, vocab]`` logits and samples the same tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from piston.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from piston.models.weight_loader import narrow, shape_of


class VocabParallelEmbedding(nn.Module):
    shard_ids = (None,)
    # Used when this weight is the LM head (its own, or tied): a platform may set a faster
    # ``kernel(x, weight, bias)`` with F.linear's contract; None runs F.linear.
    kernel: Callable[..., torch.Tensor] | None = None

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.rows
        # Rows of real tokens on this rank (the rest is padding).
        self.num_real = max(0, min(self.rows, vocab_size - self.start))
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        in_range = (local >= 0) & (local < self.num_real)
        out = F.embedding(torch.where(in_range, local, 0), self.weight)
        return tp_all_reduce(out * in_range.unsqueeze(-1).to(out.dtype))

    def load(self, param_name: str, loaded: Any, shard_id: Any = None) -> None:
        if shape_of(loaded)[0] != self.vocab_size or shape_of(loaded)[1] != self.weight.shape[1]:
            raise ValueError(f"Checkpoint tensor for the vocabulary has shape {shape_of(loaded)}, "
                             f"but the model expects ({self.vocab_size}, {self.weight.shape[1]}).")
        data = self.weight.data
        data[self.num_real:].zero_()
        if self.num_real:
            part = narrow(loaded, 0, self.start, self.num_real)
            data[:self.num_real].copy_(part if isinstance(part, torch.Tensor) else part[:])

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, rows={self.start}..{self.start + self.rows}, dim={self.weight.shape[1]}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding (so tied weights line up)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return compute_parallel_logits(hidden_states, self.weight, self.vocab_size, self.kernel)


def compute_parallel_logits(hidden_states: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                            kernel: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Full float32 logits ``[N, vocab]`` from this rank's rows of the head ``weight``
    (multiplied by ``kernel`` when given, else F.linear)."""
    logits = F.linear(hidden_states, weight) if kernel is None else kernel(hidden_states, weight, None)
    if get_tp_size() > 1:
        logits = tp_all_gather(logits, dim=-1)[:, :vocab_size]
    return logits.float()

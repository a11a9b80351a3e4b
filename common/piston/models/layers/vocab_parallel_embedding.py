"""The token embedding and the LM head, split over the vocabulary.

Each rank holds ``ceil(vocab / tp)`` consecutive rows (the last rank's tail is zero
padding). The embedding looks up the ids in its range, zeroes the others and sums over
the ranks; the LM head computes its rows' logits and gathers them, so every rank ends
with the full ``[N, vocab]`` logits and samples the same tokens.

The weight may be held packed (``use_packed_weight``, see piston.models.layers.quantized):
the embedding then decodes only the rows it looks up, and the LM head (its own, or the
tied embedding) multiplies through the ``qkernel`` slot.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from piston.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from piston.models.layers.quantized import PackedWeight
from piston.models.weight_loader import materialize, narrow, shape_of


class VocabParallelEmbedding(nn.Module):
    shard_ids = (None,)
    # Used when this weight is the LM head (its own, or tied): a platform may set a faster
    # ``kernel(x, weight, bias)`` with F.linear's contract; None runs F.linear.
    kernel: Callable[..., torch.Tensor] | None = None
    # With a packed weight: ``qkernel(x, qweight, bias)`` for the LM head and
    # ``qembed_kernel(ids, qweight) -> rows``; None dequantizes with torch.
    qkernel: Callable[..., torch.Tensor] | None = None
    qembed_kernel: Callable[..., torch.Tensor] | None = None
    # Used when this weight is the LM head: a platform's ``greedy_kernel(x) -> ids [N]`` gives
    # each row's argmax of ``x @ weight[:vocab].T`` without every logit, or None when it
    # cannot now (then the caller computes the logits). Set per instance.
    greedy_kernel: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.rows
        # Rows of real tokens on this rank (the rest is padding).
        self.num_real = max(0, min(self.rows, vocab_size - self.start))
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))
        self.qweight: PackedWeight | None = None  # set by use_packed_weight

    def use_packed_weight(self, quantize: str | None = None) -> None:
        """Hold the weight packed (call before the model's memory is allocated)."""
        self.weight = None
        self.qweight = PackedWeight(self.hidden_size, [(None, self.rows)], quantize)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return F.embedding(ids, self.weight)
        kernel = self.qembed_kernel
        return self.qweight.embedding(ids) if kernel is None else kernel(ids, self.qweight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.start
        in_range = (local >= 0) & (local < self.num_real)
        out = self._lookup(torch.where(in_range, local, 0))
        return tp_all_reduce(out * in_range.unsqueeze(-1).to(out.dtype))

    def load(self, param_name: str, loaded: Any, shard_id: Any = None) -> None:
        if shape_of(loaded)[0] != self.vocab_size or shape_of(loaded)[1] != self.hidden_size:
            raise ValueError(f"Checkpoint tensor for the vocabulary has shape {shape_of(loaded)}, "
                             f"but the model expects ({self.vocab_size}, {self.hidden_size}).")
        if self.qweight is not None:  # the rank's rows, zero rows after them (zero bytes decode to 0)
            self.qweight.add(None, narrow(loaded, 0, self.start, self.num_real), "the vocabulary")
            return
        data = self.weight.data
        data[self.num_real:].zero_()
        if self.num_real:
            data[:self.num_real].copy_(materialize(narrow(loaded, 0, self.start, self.num_real)))

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """This rank's logits ``[N, rows]``: hidden states times the weight's rows."""
        if self.qweight is not None:
            qkernel = self.qkernel
            return self.qweight.linear(hidden_states) if qkernel is None else qkernel(hidden_states, self.qweight,
                                                                                      None)
        kernel = self.kernel
        return F.linear(hidden_states, self.weight) if kernel is None else kernel(hidden_states, self.weight, None)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, rows={self.start}..{self.start + self.rows}, dim={self.hidden_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding (so tied weights line up)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return compute_parallel_logits(hidden_states, self, self.vocab_size)


def compute_parallel_logits(hidden_states: torch.Tensor, head: VocabParallelEmbedding,
                            vocab_size: int) -> torch.Tensor:
    """Full float32 logits ``[N, vocab]`` from this rank's rows of ``head`` (an LM head or
    the tied embedding)."""
    logits = head.project(hidden_states)
    if get_tp_size() > 1:
        logits = tp_all_gather(logits, dim=-1)[:, :vocab_size]
    return logits.float()

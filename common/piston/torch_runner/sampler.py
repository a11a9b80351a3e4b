"""Sampler: from a batch of logits to one token per row, in vLLM V1's order.

1. raw logprobs = log_softmax(logits), before any processing (when asked for);
2. structured outputs: forbid every token a row's grammar does not allow (packed bitmask);
   min_tokens: forbid eos and stop tokens on rows that are still too short;
3. penalties: repetition (prompt + output), frequency and presence (output only);
4. greedy rows take the argmax of the penalized logits;
5. random rows: temperature, then min_p, top_k, top_p, then an exponential race.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from piston.step.engine_messages import Logprobs
from piston.torch_runner.sampling_metadata import SamplingMetadata

_EPS = 1e-5


class LogprobsTensors(NamedTuple):
    """Top-k logprobs of N positions; column 0 is the chosen token, then the top k."""

    token_ids: torch.Tensor  # [N, k + 1] int64
    logprobs: torch.Tensor  # [N, k + 1] float32
    ranks: torch.Tensor  # [N] int64; rank of the chosen token, 1 = most likely

    def tolists(self) -> Logprobs:
        """The same rows as the msgspec struct that crosses process boundaries."""
        return Logprobs(
            token_ids=self.token_ids.tolist(),
            logprobs=self.logprobs.tolist(),
            ranks=self.ranks.tolist(),
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # Rows carry max_num_logprobs entries; the runner trims each to its request's k.
    logprobs: LogprobsTensors | None


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary, in float32."""
    return logits.log_softmax(dim=-1, dtype=torch.float32)


def gather_logprobs(
    logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor
) -> LogprobsTensors:
    """The chosen token's logprob and rank, and the num_logprobs most likely tokens.

    ``logprobs`` is [N, V], ``token_ids`` [N]. Ranks count the tokens at least as
    likely as the chosen one (vLLM's convention), so the argmax has rank 1.
    """
    token_ids = token_ids.to(torch.int64).unsqueeze(-1)
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)
    chosen = logprobs.gather(-1, token_ids)
    ranks = (logprobs >= chosen).sum(dim=-1)
    return LogprobsTensors(
        token_ids=torch.cat((token_ids, top_ids), dim=1),
        logprobs=torch.cat((chosen, top_logprobs), dim=1),
        ranks=ranks,
    )


_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: entry [b, j] is 0 where bit j of byte b is set, -inf where clear."""
    table = _BYTE_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _BYTE_TABLES[device] = torch.where(bits == 1, 0.0, float("-inf")).to(device)
    return table


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set to -inf, in place, every token whose bit is clear in its row of the packed int32
    ``bitmask`` [R, ceil(V / 32)] (bit j of word w is token 32 * w + j), for ``rows`` [R] of
    ``logits`` (all rows if None).

    Each byte of the mask picks a row of 8 additive values (0 or -inf) from a table: one
    gather and one add over the batch, no per-row loop (masked_fill with a bool mask
    expanded from the bits is several times slower on CPU).
    """
    octets = bitmask.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)  # little-endian words
    additive = torch.index_select(_byte_table(logits.device), 0, octets).view(bitmask.shape[0], -1)
    additive = additive[:, :logits.shape[-1]]
    if rows is None:
        return logits.add_(additive)
    return logits.index_add_(0, rows, additive)


def apply_min_tokens(logits: torch.Tensor, min_tokens: dict[int, set[int]]) -> torch.Tensor:
    """Set the forbidden tokens of each listed row to -inf, in place."""
    if not min_tokens:
        return logits
    rows = [row for row, ids in min_tokens.items() for _ in ids]
    cols = [tok for ids in min_tokens.values() for tok in ids]
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    logits[index] = float("-inf")
    return logits


def _output_counts(output_token_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[B, V] float32: how often each token occurs in each row's output."""
    num_rows = len(output_token_ids)
    max_len = max((len(ids) for ids in output_token_ids), default=0)
    # Pad with vocab_size so the padding lands in a spare column dropped below.
    padded = np.full((num_rows, max_len), vocab_size, dtype=np.int64)
    for row, ids in enumerate(output_token_ids):
        padded[row, : len(ids)] = ids
    index = torch.from_numpy(padded).to(device)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties, as HF and OpenAI define them.

    Repetition divides positive logits (multiplies negative ones) of every token
    seen in the prompt or the output; frequency subtracts penalty * output count;
    presence subtracts penalty once for any token present in the output.
    """
    num_rows, vocab_size = logits.shape
    counts = _output_counts(md.output_token_ids, vocab_size, logits.device)
    in_output = counts > 0
    seen = in_output.clone()
    if md.prompt_token_ids is not None:
        in_prompt = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
        in_prompt.scatter_(1, md.prompt_token_ids, True)
        seen |= in_prompt[:, :vocab_size]
    rep = md.repetition_penalties.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits -= md.frequency_penalties.unsqueeze(1) * counts
    logits -= md.presence_penalties.unsqueeze(1) * in_output
    # An extreme penalty (repetition 1e-300) overflows to +inf, which would make the softmax
    # NaN; the largest finite value keeps the row's order. -inf (forbidden) stays.
    return logits.clamp_(max=torch.finfo(logits.dtype).max)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's k most likely tokens, then its smallest nucleus of mass >= p.

    One ascending sort serves both; the most likely token always survives.
    """
    if k is None and p is None:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[-1]
    if k is not None:
        # Exactly k survive, even with ties: mask by sorted position, not by value.
        positions = torch.arange(vocab_size, device=logits.device)
        drop = positions.unsqueeze(0) < (vocab_size - k).unsqueeze(1)
        sorted_logits.masked_fill_(drop, float("-inf"))
    if p is not None:
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum_probs <= (1.0 - p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(-1, sorted_idx, sorted_logits)


def torch_argmax(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator],
                     argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax) -> torch.Tensor:
    """argmax(probs / E) with E ~ Exponential(1): a sample from each row of probs.

    Unseeded rows share one batched draw; a seeded row draws from its own
    generator only, so its token depends on its seed and history, not the batch.
    """
    noise = torch.empty_like(probs).exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # exponential_ never draws 0 (its documented support is (0, inf)), so a token of
    # probability 0 (masked by a grammar, cut by top-k/top-p) never wins by 0/0 = NaN.
    return argmax(probs.div_(noise))


def process_logits(logits: torch.Tensor, md: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 1-3: the raw logprobs (None when no row asks), and the logits in float32 with
    grammar masks, min_tokens and penalties applied (``logits`` may be modified in place)."""
    raw_logprobs = None if md.max_num_logprobs is None else compute_logprobs(logits)
    logits = logits.to(torch.float32)
    if md.allowed_bitmask is not None:
        logits = apply_token_bitmask(logits, md.allowed_bitmask, md.bitmask_rows)
    logits = apply_min_tokens(logits, md.min_tokens)
    if not md.no_penalties:
        logits = apply_penalties(logits, md)
    return logits, raw_logprobs


class Sampler(nn.Module):
    """Turns [B, V] logits into one token per row; see the module docstring for order.

    ``argmax`` (rows of a float32 [B, V] matrix -> int64 [B], as ``torch.argmax(x, -1)``)
    is where a platform plugs in a faster kernel (the CPU's reads at memory speed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax

    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row. ``logits`` is used as scratch and modified in place."""
        logits, raw_logprobs = process_logits(logits, md)
        sampled = self.sample(logits, md)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, md.max_num_logprobs, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Greedy rows take the argmax; random rows go through the filters and the race."""
        greedy = None if md.all_random else self.argmax(logits)
        if md.all_greedy:
            return greedy
        is_greedy = md.temperature < _EPS
        # Greedy rows get temperature 1 so the shared division stays finite.
        temperature = torch.where(is_greedy, 1.0, md.temperature)
        logits = logits.div_(temperature.unsqueeze(1))
        if md.min_p is not None:
            logits = apply_min_p(logits, md.min_p)
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        random = exponential_race(probs, md.generators, self.argmax)
        if greedy is None:
            return random
        return torch.where(is_greedy, greedy, random)

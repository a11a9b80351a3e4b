"""SamplingMetadata: the per-step sampling parameters of a batch, as tensors.

The model runner fills one each step. Row i is the i-th request that samples
this step, in batch order; every tensor lives on the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    # [B] float32; 0.0 on greedy rows.
    temperature: torch.Tensor
    all_greedy: bool
    all_random: bool
    # [B] float32; None when no row uses top-p (< 1).
    top_p: torch.Tensor | None
    # [B] int64, vocab_size on rows without top-k; None when no row uses it.
    top_k: torch.Tensor | None
    # [B] float32; None when no row uses it.
    min_p: torch.Tensor | None
    # row -> the request's own seeded generator, advanced by every draw.
    generators: dict[int, torch.Generator]
    # Largest k asked for in the batch; None = no row wants logprobs.
    max_num_logprobs: int | None
    no_penalties: bool
    # [B] float32 each; 0, 0 and 1 disable them.
    presence_penalties: torch.Tensor
    frequency_penalties: torch.Tensor
    repetition_penalties: torch.Tensor
    # [B, max_prompt_len] int64 padded with vocab_size; None when no_penalties.
    prompt_token_ids: torch.Tensor | None
    # Tokens generated so far, per row (for penalties).
    output_token_ids: list[list[int]]
    # row -> token ids to forbid (eos + stop_token_ids) until min_tokens are produced.
    min_tokens: dict[int, set[int]]
    # [R, ceil(V / 32)] int32 packed masks of the tokens the constrained rows ``bitmask_rows``
    # [R] may sample (structured outputs); None when no row is constrained.
    allowed_bitmask: torch.Tensor | None = None
    bitmask_rows: torch.Tensor | None = None

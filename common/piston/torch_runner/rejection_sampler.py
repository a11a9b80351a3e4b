"""RejectionSampler: speculative decoding's sampler, in torch (CPU and CUDA).

Given the target model's logits at every position of a SpecDecodeBatch (each request's
last token, then each of its drafts), it keeps the longest run of drafts the target
accepts and adds one token of its own:

- the logits of each position go through the Sampler's processing for the output that
  position would follow (structured-output mask, min_tokens, penalties with the earlier
  drafts counted as output), then temperature, min_p, top-k and top-p: the distribution
  ``p`` the ordinary sampler would sample from there;
- a greedy request accepts a draft while it equals the argmax of ``p``, and adds the
  argmax after the last accepted draft, so its tokens are the non-speculative greedy
  tokens exactly;
- a sampled request accepts draft ``d`` with probability ``p(d)`` (the speculative rule
  ``min(1, p(d) / q(d))`` for a proposer that drafts ``d`` with certainty, ``q(d) = 1``).
  At the first rejection it samples from the residual ``max(p - q, 0)`` normalised, that is
  ``p`` without ``d``; when every draft is accepted it samples a bonus token from ``p`` at
  the last position. Each token is then distributed exactly as ``p`` (Leviathan et al.,
  2023, Theorem 1);
- logprobs are the target's raw logprobs (before any processing) of the returned tokens.

A seeded request draws its uniforms and its final token's noise from its own generator,
which the runner derives per step from the seed and the output length, so its tokens
depend on its seed and history only, also after a preemption.
"""

from __future__ import annotations

import numpy as np
import torch

from piston.step.spec_decode import SpecDecodeBatch
from piston.torch_runner.sampler import (_EPS, LogprobsTensors, apply_min_p, apply_top_k_top_p, gather_logprobs,
                                         process_logits)
from piston.torch_runner.sampling_metadata import SamplingMetadata


class RejectionSampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata, spec: SpecDecodeBatch,
                 generators: dict[int, torch.Generator]) -> tuple[list[list[int]], LogprobsTensors | None]:
        """``logits`` [T, V] at the positions of ``spec``; ``md`` has one row per position
        (SamplingBatch.expand); ``generators``: request index -> its generator for this
        step. Returns each request's tokens, and the logprobs of all of them in order."""
        device = logits.device
        logits, raw_logprobs = process_logits(logits, md)

        num_req = len(spec.num_draft)
        is_draft = spec.is_draft
        draft_at = spec.draft_at_position
        request = spec.position_request
        greedy_pos = np.ones(len(request), bool) if md.all_greedy else (md.temperature < _EPS).cpu().numpy()
        greedy_req = greedy_pos[spec.cu_num_positions[:-1]]

        argmax = None if md.all_random else logits.argmax(dim=-1)
        probs = None
        if not md.all_greedy:
            temperature = torch.where(md.temperature < _EPS, 1.0, md.temperature)
            logits = logits.div_(temperature.unsqueeze(1))
            if md.min_p is not None:
                logits = apply_min_p(logits, md.min_p)
            logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
            probs = logits.softmax(dim=-1, dtype=torch.float32)

        # Which drafts are accepted: the greedy rows' argmax and the sampled rows' p(draft).
        argmax_np = argmax.cpu().numpy() if argmax is not None else np.zeros(len(request), np.int64)
        p_draft = np.zeros(len(request), np.float32)
        uniform = np.ones(len(request), np.float32)
        random_draft = is_draft & ~greedy_pos
        if probs is not None and random_draft.any():
            draft_t = torch.from_numpy(np.maximum(draft_at, 0)).to(device)
            p_draft = probs.gather(1, draft_t.unsqueeze(1)).squeeze(1).cpu().numpy()
            uniform = self._uniforms(is_draft, request, generators, device)
        num_accepted = spec.count_accepted(greedy_pos, argmax_np, p_draft, uniform)
        final_pos = spec.final_positions(num_accepted)

        final = np.zeros(num_req, dtype=np.int64)
        if argmax is not None and greedy_req.any():
            final[greedy_req] = argmax_np[final_pos[greedy_req]]
        if probs is not None and not greedy_req.all():
            rand_req = np.flatnonzero(~greedy_req)
            pos = final_pos[rand_req]
            p = probs[torch.from_numpy(pos).to(device)]
            rejected = is_draft[pos]  # the final position checked a draft and rejected it
            if rejected.any():
                rows = torch.from_numpy(np.flatnonzero(rejected)).to(device)
                cols = torch.from_numpy(draft_at[pos[rejected]]).to(device)
                p[rows, cols] = 0.0  # the residual max(p - q, 0) for q one-hot at the draft
            noise = torch.empty_like(p).exponential_()
            for j, i in enumerate(rand_req.tolist()):
                gen = generators.get(i)
                if gen is not None:
                    noise[j].exponential_(generator=gen)
            final[rand_req] = p.div_(noise).argmax(dim=-1).cpu().numpy()

        tokens = spec.accepted_tokens(num_accepted, final)
        logprobs = None
        if raw_logprobs is not None:
            out_pos = spec.output_positions(num_accepted)
            flat = torch.tensor([t for ts in tokens for t in ts], dtype=torch.int64, device=device)
            logprobs = gather_logprobs(raw_logprobs[torch.from_numpy(out_pos).to(device)], md.max_num_logprobs, flat)
        return tokens, logprobs

    @staticmethod
    def _uniforms(is_draft: np.ndarray, request: np.ndarray, generators: dict[int, torch.Generator],
                  device: torch.device) -> np.ndarray:
        """[T] uniforms in [0, 1) for the draft positions: a seeded request's from its own
        generator, one per draft it checks (whatever the other requests do)."""
        u = torch.rand(len(request), device=device)
        for i, gen in generators.items():
            where = np.flatnonzero((request == i) & is_draft)
            u[torch.from_numpy(where).to(device)] = torch.rand(len(where), generator=gen, device=device)
        return u.cpu().numpy()

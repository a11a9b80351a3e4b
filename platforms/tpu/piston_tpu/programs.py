"""The XLA programs of one engine, compiled ahead of time for every shape bucket.

Per token bucket T: ``forward`` (the model over T tokens, also returning the hidden rows
of the sampled tokens) and ``gather_rows`` (hidden rows for prompt logprobs). Per
request bucket R: ``logits``, ``penalize``, ``grammar`` (structured outputs' masks),
``sample`` and ``logprobs``, and ``spec_verify`` with speculative decoding. That is
len(T) * 2 + len(R) * 5 programs (len(R) * 6 with speculation), compiled by
``compile_all`` with a progress bar; a call with a shape no program was compiled for
raises instead of compiling.

A draft model (speculative decoding, ``draft=True``) has its own set: ``forward`` per token
bucket and ``draft_tokens`` (the argmax of the logits of the sampled rows) per request
bucket. An EAGLE head (``eagle=True``) has ``eagle_forward``, ``gather_target`` (the target's
hidden rows of the step's bucket) and ``gather_last`` (rows of the head's last outputs) per
token bucket instead of ``forward``; an EAGLE-3 head's ``gather_target`` fuses the target's
aux layers with ``fc``, and its ``draft_tokens`` maps its draft vocabulary to the target's.
With ``aux_layers`` the target's ``forward`` also returns those layers' inputs.

The target's ``forward`` takes the step's metadata per KV cache group (``num_groups``: a
leading group axis on the slot mapping and page table, piston_tpu.step_inputs); a draft
model's or EAGLE head's programs take one group's (``num_groups`` None: no group axis).

With LoRA slots in the parameters (piston_tpu.lora), ``forward`` takes each token's slot
(int32 [T]) and one more program, ``write_lora_slot`` (bucket 0), writes an adapter into a
slot of every LoRA stack.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from piston_tpu import lora, sampler
from piston_tpu.attention_metadata import AttentionMetadata
from piston_tpu.model import (LlamaSpec, _linear, compute_logits, eagle3_forward, eagle3_tokens, eagle_forward,
                              forward)

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


class ModelPrograms:
    """Holds the compiled executables, keyed by (program name, bucket)."""

    def __init__(self, spec: LlamaSpec, attention: Callable, rotary_dim: int, token_buckets: list[int],
                 request_buckets: list[int], max_seqs: int, pages_per_seq: int, precision,
                 speculative: bool = False, draft: bool = False, eagle: bool = False, eagle3: bool = False,
                 norm_before_residual: bool = False, aux_layers: tuple[int, ...] = (),
                 num_groups: int | None = None) -> None:
        self.spec = spec
        self.speculative = speculative
        self.draft = draft or eagle or eagle3
        self.eagle = eagle or eagle3
        self.eagle3 = eagle3
        self.aux_layers = aux_layers  # the target's, when an EAGLE-3 head drafts
        self.token_buckets = token_buckets
        self.request_buckets = request_buckets
        self.max_seqs = max_seqs
        self.pages_per_seq = pages_per_seq
        self.num_groups = num_groups
        self.compiled: dict[tuple[str, int], Any] = {}
        self._forward = jax.jit(functools.partial(forward, spec=spec, attention=attention, rotary_dim=rotary_dim,
                                                  precision=precision, aux_layers=aux_layers), donate_argnums=(2,))
        self._gather_rows = jax.jit(lambda hidden, idx: hidden[idx])
        self._write_lora_slot = jax.jit(lora.write_slot, donate_argnums=(0,))
        if eagle:
            self._forward = jax.jit(functools.partial(eagle_forward, spec=spec, attention=attention,
                                                      rotary_dim=rotary_dim, precision=precision), donate_argnums=(2,))
        if eagle3:
            self._forward = jax.jit(functools.partial(eagle3_forward, spec=spec, attention=attention,
                                                      rotary_dim=rotary_dim, precision=precision,
                                                      norm_before_residual=norm_before_residual), donate_argnums=(2,))
            # The first pass's features: the target's aux layers at the rows, fused by fc.
            self._gather_target = jax.jit(lambda aux, idx, fc: _linear(aux[idx].astype(fc.dtype), fc, precision))
        self._precision = precision

    # ----- compilation ------------------------------------------------------------

    def _jobs(self, params, rope, kv_cache) -> list[tuple[str, int, Callable[[], Any]]]:
        spec, s = self.spec, self.max_seqs
        vocab, hidden = spec.vocab_size, spec.hidden_size
        act_dtype = params["embed" if "embed" in params else "fc"].dtype
        jobs = []
        groups = () if self.num_groups is None else (self.num_groups,)
        for t in self.token_buckets:
            md = AttentionMetadata(
                slot_mapping=_spec((*groups, t), np.int32), token_positions=_spec((t,), np.int32),
                token_seqs=_spec((t,), np.int32), kv_lens=_spec((s,), np.int32),
                cu_q_lens=_spec((s + 1,), np.int32),
                page_indices=_spec((*groups, s, self.pages_per_seq), np.int32), num_seqs=_spec((1,), np.int32))
            args = (params, rope, kv_cache, _spec((t,), np.int32), _spec((t,), np.int32), md, _spec((s,), np.int32))
            if self.eagle:
                feats = _spec((t, hidden), act_dtype)
                args = (*args[:6], feats, args[6], _spec((vocab, hidden), act_dtype))
                jobs.append(("eagle_forward", t, functools.partial(self._forward.lower, *args)))
                if self.eagle3:
                    fc = params["fc"]
                    jobs.append(("gather_target", t, functools.partial(
                        self._gather_target.lower, _spec((t, fc.shape[1]), act_dtype), _spec((t,), np.int32), fc)))
                else:
                    jobs.append(("gather_target", t, functools.partial(
                        self._gather_rows.lower, feats, _spec((t,), np.int32))))
                jobs.append(("gather_last", t, functools.partial(
                    self._gather_rows.lower, _spec((s, hidden), act_dtype), _spec((t,), np.int32))))
                continue
            if "lora_a_qkv" in params:  # each token's LoRA slot
                args = (*args, _spec((t,), np.int32))
            jobs.append(("forward", t, functools.partial(self._forward.lower, *args)))
            if self.draft:
                continue
            jobs.append(("gather_rows", t, functools.partial(
                self._gather_rows.lower, _spec((t, hidden), act_dtype), _spec((s,), np.int32))))
        stacks = {n: p for n, p in params.items() if lora.is_lora_param(n)}
        if stacks:
            values = {n: _spec(p.shape[:1] + p.shape[2:], p.dtype) for n, p in stacks.items()}
            jobs.append(("write_lora_slot", 0, functools.partial(
                self._write_lora_slot.lower, stacks, _spec((), np.int32), values)))
        head = params.get("lm_head", params.get("embed"))
        if head is None:  # an EAGLE head's logits come from its target's head
            head = _spec((vocab, hidden), act_dtype)
        if self.eagle3:
            for r in self.request_buckets:
                tokens = functools.partial(lambda r_, p, h: eagle3_tokens(p, h[:r_], spec.rms_norm_eps,
                                                                          self._precision), r)
                head_params = {n: params[n] for n in ("norm", "lm_head", "d2t")}
                jobs.append(("draft_tokens", r, functools.partial(jax.jit(tokens).lower, head_params,
                                                                  _spec((s, hidden), act_dtype))))
            return jobs
        if self.draft:
            for r in self.request_buckets:
                argmax = functools.partial(lambda r_, w, h: jnp.argmax(
                    compute_logits({"embed": w}, h[:r_], self._precision), axis=-1).astype(jnp.int32), r)
                jobs.append(("draft_tokens", r, functools.partial(jax.jit(argmax).lower, head,
                                                                  _spec((s, hidden), act_dtype))))
            return jobs
        for r in self.request_buckets:
            logits = _spec((r, vocab), np.float32)
            rows = functools.partial(lambda r_, w, h: compute_logits({"embed": w}, h[:r_], self._precision,
                                                                     spec.final_logit_softcapping), r)
            jobs.append(("logits", r, functools.partial(jax.jit(rows).lower, head, _spec((s, hidden), act_dtype))))
            jobs.append(("grammar", r, functools.partial(
                jax.jit(sampler.apply_bitmask).lower, logits, _spec((r, (vocab + 31) // 32), np.int32))))
            jobs.append(("penalize", r, functools.partial(
                jax.jit(sampler.penalize).lower, logits, _spec((r, vocab), np.int32), _spec((r, vocab), bool),
                _spec((r, vocab), bool), *[_spec((r,), np.float32)] * 3)))
            inputs = sampler.SamplingInputs(
                temperature=_spec((r,), np.float32), top_k=_spec((r,), np.int32), top_p=_spec((r,), np.float32),
                min_p=_spec((r,), np.float32), seeds=_spec((r,), np.uint32), seeded=_spec((r,), bool),
                counters=_spec((r,), np.int32), step_key=_spec((2,), np.uint32), flags=_spec((4,), bool))
            jobs.append(("sample", r, functools.partial(jax.jit(sampler.sample).lower, logits, logits, inputs)))
            jobs.append(("logprobs", r, functools.partial(
                jax.jit(sampler.logprobs_of).lower, logits, _spec((r,), np.int32))))
            if self.speculative:
                jobs.append(("spec_verify", r, functools.partial(
                    jax.jit(sampler.spec_verify).lower, logits, _spec((r,), np.int32), inputs)))
        return jobs

    def compile_all(self, params, rope, kv_cache) -> None:
        """Compile every program for every bucket (a progress bar on a terminal).

        One at a time: XLA's CPU compiler already uses several threads, and parallel
        compilations ran slower than sequential ones on a 2-core machine.
        """
        start = time.perf_counter()
        times: dict[str, float] = {}
        jobs = self._jobs(params, rope, kv_cache)
        for name, bucket, lower in tqdm(jobs, desc="Compiling XLA programs", unit="program", leave=False,
                                        disable=None):
            t0 = time.perf_counter()
            self.compiled[(name, bucket)] = lower().compile()
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        logger.info("Compiled %d XLA programs in %.1f s (%s) for token buckets %s and request buckets %s.",
                    len(jobs), time.perf_counter() - start, ", ".join(f"{k} {v:.1f} s" for k, v in times.items()),
                    self.token_buckets, self.request_buckets)

    # ----- calls ------------------------------------------------------------------

    def __call__(self, name: str, bucket: int, *args):
        program = self.compiled.get((name, bucket))
        if program is None:
            raise RuntimeError(f"No compiled {name!r} program for bucket {bucket}; compiled buckets: "
                               f"{sorted(b for n, b in self.compiled if n == name)}. Call warm_up() first.")
        return program(*args)


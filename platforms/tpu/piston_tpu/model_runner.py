"""JaxModelRunner: the TPU platform's model runner, the JAX half of the step layer's ModelRunner.

The step itself (the scheduler's diff, the rows to sample, prompt-logprob spans, the
output) is ``piston.step.model_runner.ModelRunner``. This class supplies the JAX part:
the step's inputs padded to their buckets (step_inputs), the compiled forward program of
the token bucket, then the logits/penalty/sampling programs of the request bucket.
Nothing on the hot path compiles: every program is built in ``warm_up`` and a
RecompileDetector turns any later compilation into an error.

Multi-LoRA (``config.lora_config``): the parameters hold ``max_loras`` adapter slots
(piston_tpu.lora); ``write_lora_slot`` fills one with a compiled program and
``set_lora_mapping`` gives the next forward its tokens' slots, a program input.

A hybrid KV cache layout (``self.kv_layout``, piston.step.kv_cache_layout): the cache holds
``num_cache_layers`` tensors, the step's metadata one slot mapping and page table per group,
and the model's scan gives each layer its group's and its tensor (LlamaSpec.layer_group,
layer_cache). A draft model or EAGLE head (never with a hybrid layout) reads group 0.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from piston.step import named_tensors
from piston.step.config import EngineConfig
from piston.step.input_batch import ScheduledTokens
from piston.step.lora_adapter import LoRAAdapter
from piston.step.model_runner import ModelRunner
from piston.step.runner_output import Logprobs, ModelRunnerOutput
from piston.step.sampling_batch import SamplingBatch
from piston.step.scheduler_output import SchedulerOutput
from piston.step.spec_decode import SpecDecodeBatch

from piston_tpu import buckets, lora, sampler
from piston_tpu.attention import choose_attention, make_attention, page_table_multiple
from piston_tpu.compilation_cache import enable_compilation_cache
from piston_tpu.draft_model import DraftModel
from piston_tpu.kv_cache import kv_cache_shape
from piston_tpu.model import LlamaSpec, rope_arrays
from piston_tpu.programs import ModelPrograms
from piston_tpu.recompile_detector import RecompileDetector
from piston_tpu.step_inputs import StepInputBuilder, StepInputs

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))

_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class StepHidden(NamedTuple):
    """What ``forward`` hands to prompt logprobs and sampling."""

    step: StepInputs
    hidden: jax.Array  # [token bucket, hidden]
    hidden_sampled: jax.Array  # [max_seqs, hidden]: the sampled requests' rows first
    aux: jax.Array | None = None  # [token bucket, 3 * hidden]: an EAGLE-3 head's aux layers' inputs


class JaxModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, on_tpu: bool) -> None:
        mc, sc = config.model_config, config.scheduler_config
        if mc.dtype not in _DTYPES:
            raise ValueError(f"dtype={mc.dtype!r} is not supported on the TPU platform; use one of {tuple(_DTYPES)}.")
        super().__init__(config)
        self.on_tpu = on_tpu
        self.dtype = np.dtype(_DTYPES[mc.dtype])
        self.kv_dtype = np.dtype(_DTYPES[config.kv_cache_dtype])  # how the KV cache stores K/V
        self.spec = LlamaSpec.from_model_config(mc)
        if self.kv_layout.hybrid:  # each layer's KV cache group and tensor ride in the layer scan
            self.spec = dataclasses.replace(self.spec, layer_group=self.kv_layout.layer_group,
                                            layer_cache=self.kv_layout.layer_cache)
        if self.spec.num_experts and config.lora_config is not None:
            raise ValueError(f"LoRA adapters on a mixture-of-experts model ({self.spec.architecture}) are not "
                             "supported on the TPU platform: its expert MLPs take no adapter deltas.")
        self.token_buckets = buckets.token_buckets(sc.max_num_batched_tokens)
        self.request_buckets = buckets.request_buckets(sc.max_num_seqs)
        self.max_seqs = self.request_buckets[-1]
        multiple = page_table_multiple(self.block_size)
        self.pages_per_seq = -(-self.batch.block_table.shape[2] // multiple) * multiple
        self.attention_name = choose_attention(self.spec.num_layers, on_tpu)
        # float32 runs must not drop to bf16 matmul passes on a TPU.
        self.precision = lax.Precision.HIGHEST if self.dtype == np.float32 else None
        self.params: dict[str, jax.Array] = {}
        self.host_params: dict[str, np.ndarray] | None = None  # kept by a level-1 sleep
        self.rope: tuple[jax.Array, jax.Array] | None = None
        self.rotary_dim = 0
        self.kv_cache: jax.Array | None = None
        self.num_blocks = 0
        self.programs: ModelPrograms | None = None
        self.inputs: StepInputBuilder | None = None
        self.detector = RecompileDetector().__enter__()
        self.step_count = 0
        spec = config.speculative_config
        self.draft: DraftModel | None = None  # speculative decoding by a draft model
        if spec is not None and spec.uses_draft_model:
            self.draft = DraftModel(spec.draft_model_config, self.dtype, self.max_model_len,
                                    eagle=spec.is_eagle and not spec.is_eagle3, eagle3=spec.is_eagle3)
        # An EAGLE-3 head reads the inputs of three target layers: the forward programs return them.
        self.aux_layers: tuple[int, ...] = ()
        if spec is not None and spec.is_eagle3:
            from piston.step.eagle3_layers import aux_layer_ids

            self.aux_layers = aux_layer_ids(spec.draft_model_config.hf_config, self.spec.num_layers)
        self.lora_token_slots: np.ndarray | None = None  # the next forward's (set_lora_mapping)

    # ----- set-up -----------------------------------------------------------------

    def load_model(self) -> None:
        from piston_tpu.weights import load_params

        start = time.perf_counter()
        mc = self.config.model_config
        params = load_params(self.spec, mc, self.dtype)
        self.params = {name: jnp.asarray(array) for name, array in params.items()}
        self._add_lora_slots({})
        self.rope, self.rotary_dim = rope_arrays(self.spec, mc.hf_config, self.max_model_len)
        num_params = sum(int(np.prod(p.shape)) for n, p in self.params.items() if not lora.is_lora_param(n))
        logger.info("Loaded %s (%s, JAX) in %.2f s: %.1fM parameters in %s on %s; attention: %s%s.",
                    mc.path or mc.model, self.spec.architecture, time.perf_counter() - start, num_params / 1e6,
                    mc.dtype, jax.devices()[0].platform, self.attention_name,
                    "" if self.on_tpu or self.attention_name == "xla" else " (Pallas interpret mode)")
        if self.draft is not None:
            self.draft.load()

    # ----- multi-LoRA (piston_tpu.lora) ----------------------------------------------------

    def _add_lora_slots(self, kept: dict[str, jax.Array]) -> None:
        """With LoRA on, put the slot stacks into the parameters: ``kept`` (those of the
        weights replaced), else zeros, forgetting which adapters the slots held."""
        lc = self.config.lora_config
        if lc is None:
            return
        if kept:
            self.params.update(kept)
            return
        self.params.update(lora.zero_params(self.spec, lc.max_loras, lc.max_lora_rank, self.dtype))
        nbytes = sum(int(self.params[n].nbytes) for n in lora.PARAM_NAMES)
        logger.info("LoRA: %d adapter slots of rank <= %d (%.1f MB).", lc.max_loras, lc.max_lora_rank, nbytes / 1e6)
        if self.lora is not None and any(self.lora.slot_ids):
            self.lora.forget_slots()

    def write_lora_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        lc = self.config.lora_config
        values = lora.slot_values(self.spec, adapter, lc.max_lora_rank, self.dtype)
        if not self.params:  # asleep: the host copies of a level-1 sleep, else nothing to keep
            if self.host_params is not None:
                for n, v in values.items():
                    self.host_params[n][:, slot] = v
            return
        stacks = {n: self.params[n] for n in lora.PARAM_NAMES}
        if self.programs is not None:
            self.params.update(self.programs("write_lora_slot", 0, stacks, np.int32(slot), values))
            return
        for n, stack in stacks.items():  # before warm-up: through the host, compiling nothing
            host = np.array(jax.device_get(stack))
            host[:, slot] = values[n]
            self.params[n] = jnp.asarray(host)

    def set_lora_mapping(self, token_slots: np.ndarray) -> None:
        self.lora_token_slots = np.asarray(token_slots, np.int32)

    def _lora_slots_input(self, num_tokens: int, bucket: int) -> np.ndarray:
        """int32 [bucket]: the step's tokens' slots; ``max_loras`` (no slot's one-hot) for
        tokens without an adapter and for the padding."""
        none = self.config.lora_config.max_loras
        out = np.full(bucket, none, np.int32)
        slots, self.lora_token_slots = self.lora_token_slots, None
        if slots is not None:
            if len(slots) != num_tokens:
                raise ValueError(f"the LoRA mapping has {len(slots)} tokens, the step {num_tokens}.")
            out[:num_tokens] = np.where(slots >= 0, slots, none)
        return out

    def kv_cache_bytes_per_block(self) -> int:
        kv_dtype = self.config.kv_cache_dtype
        draft = self.draft.kv_bytes_per_block(self.block_size, kv_dtype) if self.draft is not None else 0
        return self.config.model_config.kv_bytes_per_block(
            self.block_size, num_cache_layers=self.kv_layout.num_cache_layers, kv_cache_dtype=kv_dtype) + draft

    def initialize_kv_cache(self, num_blocks: int) -> None:
        s = self.spec
        self.num_blocks = num_blocks
        # Zeros: padded reads of unused slots must be finite so masking can remove them.
        # A hybrid layout's groups share the tensors: layer l uses tensor kv_layout.layer_cache[l].
        self.kv_cache = jnp.zeros(kv_cache_shape(self.kv_layout.num_cache_layers, num_blocks, self.block_size,
                                                 s.num_kv_heads, s.head_dim), self.kv_dtype)
        self.inputs = StepInputBuilder(self.batch, self.block_size, num_blocks * self.block_size, self.max_seqs,
                                       self.pages_per_seq)
        if self.draft is not None:
            self.draft.initialize_kv_cache(num_blocks, self.block_size, self.kv_dtype)

    def release_kv_cache(self) -> None:
        self.kv_cache = None
        if self.draft is not None:
            self.draft.kv_cache = None

    # ----- sleep mode and weight updates (the Worker's interface version 6) ----------------

    def release_weights(self, keep_host: bool) -> int:
        """Delete the weights' device buffers, keeping host copies with ``keep_host``;
        returns the bytes released. The compiled programs take the weights as arguments, so
        they stay valid."""
        if not self.params:
            return 0
        nbytes = sum(int(p.nbytes) for p in self.params.values())
        self.host_params = {n: np.array(jax.device_get(p)) for n, p in self.params.items()} if keep_host else None
        for p in self.params.values():
            p.delete()
        self.params = {}
        if self.draft is not None:
            nbytes += self.draft.release_weights(keep_host)
        return nbytes

    def restore_weights(self) -> None:
        """Put the weights back on the device: from the host copies, else from the checkpoint."""
        if self.draft is not None:
            self.draft.restore_weights()
        if self.params:
            return
        if self.host_params is None:
            self.reload_weights()
            return
        self.params = {n: jnp.asarray(a) for n, a in self.host_params.items()}
        self.host_params = None

    def reload_weights(self) -> None:
        from piston_tpu.weights import load_params

        start = time.perf_counter()
        params = load_params(self.spec, self.config.model_config, self.dtype)
        kept = {n: p for n, p in self.params.items() if lora.is_lora_param(n)}
        self.params = {name: jnp.asarray(array) for name, array in params.items()}
        self._add_lora_slots(kept)
        logger.info("Reloaded the weights in %.2f s.", time.perf_counter() - start)

    def update_weights(self, weights: list) -> int:
        """Write wire tensors (piston.step.named_tensors, Hugging Face names) into the
        stacked parameters; returns how many were applied."""
        from piston_tpu.weights import updated_params

        if not self.params:
            raise ValueError("the weights are asleep; wake_up(tags=['weights']) before updating them.")
        changed, count = updated_params(self.spec, self.params, [named_tensors.to_numpy(w) for w in weights])
        self.params.update({n: jnp.asarray(a) for n, a in changed.items()})
        return count

    def close(self) -> None:
        """Drop the device buffers and stop listening for compilations."""
        self.detector.__exit__(None, None, None)
        self.kv_cache = None
        self.params = {}
        self.draft = None

    def warm_up(self) -> None:
        """Compile every program for every bucket, then arm the recompile detector."""
        if self.programs is None:
            folder = enable_compilation_cache(self.config.compilation_config.cache_dir)
            if folder:
                logger.info("XLA programs are cached in %s.", folder)
            attention = make_attention(self.attention_name, self.spec.query_scale, self.on_tpu,
                                       self.block_size, self.precision)
            self.programs = ModelPrograms(self.spec, attention, self.rotary_dim, self.token_buckets,
                                          self.request_buckets, self.max_seqs, self.pages_per_seq, self.precision,
                                          speculative=self.proposer is not None, aux_layers=self.aux_layers,
                                          num_groups=self.kv_layout.num_groups)
            self.programs.compile_all(self.params, self.rope, self.kv_cache)
        if self.draft is not None:
            self.draft.warm_up(self.attention_name, self.on_tpu, self.block_size, self.precision, self.token_buckets,
                               self.request_buckets, self.max_seqs, self.pages_per_seq)
        self.detector.arm()

    # ----- the platform's part of a step --------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        output = super().execute_model(scheduler_output)
        self.detector.check(f"step {self.step_count}")
        return output

    def forward(self, scheduled: ScheduledTokens, scheduler_output: SchedulerOutput) -> StepHidden:
        self.step_count += 1
        step = self.inputs.build(scheduled, buckets.pick_bucket(self.token_buckets, scheduled.num_tokens))
        sample_idx = np.zeros(self.max_seqs, np.int32)
        sample_idx[:len(scheduled.logits_indices)] = scheduled.logits_indices
        extra = () if self.config.lora_config is None else (self._lora_slots_input(scheduled.num_tokens,
                                                                                    step.bucket),)
        hidden, hidden_sampled, self.kv_cache, *aux = self.programs(
            "forward", step.bucket, self.params, self.rope, self.kv_cache, step.input_ids, step.positions,
            step.metadata, sample_idx, *extra)
        return StepHidden(step, hidden, hidden_sampled, aux[0] if aux else None)

    def draft_forward(self, scheduled: ScheduledTokens, hidden: StepHidden | None = None,
                      hidden_index: np.ndarray | None = None) -> np.ndarray:
        if hidden_index is None:
            step = self.inputs.build(scheduled, buckets.pick_bucket(self.token_buckets, scheduled.num_tokens))
            return self.draft.run(step.group(0), scheduled.logits_indices, self.max_seqs)
        # An EAGLE head: its first pass reads the target's hidden states, in the step's bucket.
        bucket = hidden.step.bucket if hidden is not None else buckets.pick_bucket(self.token_buckets,
                                                                                   scheduled.num_tokens)
        step = self.inputs.build(scheduled, bucket, token_shift=1)
        return self.draft.run_eagle(step.group(0), scheduled.logits_indices, self.max_seqs,
                                    None if hidden is None else hidden.aux if self.aux_layers else hidden.hidden,
                                    hidden_index, self.params["embed"],
                                    self._head())

    def prompt_logprobs(self, hidden: StepHidden, token_indices: np.ndarray, targets: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, values, ranks = [], [], []
        targets = targets.astype(np.int32)
        for c in range(0, len(targets), self.max_seqs):
            chunk_rows, chunk_targets = token_indices[c:c + self.max_seqs], targets[c:c + self.max_seqs]
            n = len(chunk_rows)
            r = buckets.pick_bucket(self.request_buckets, n)
            selected = self.programs("gather_rows", hidden.step.bucket, hidden.hidden,
                                     _pad(chunk_rows, self.max_seqs, 0, np.int32))
            logits = self.programs("logits", r, self._head(), selected)
            if k > sampler.MAX_DEVICE_LOGPROBS:
                got = sampler.host_logprobs(np.asarray(logits)[:n], chunk_targets, k)
            else:
                lp = self.programs("logprobs", r, logits, _pad(chunk_targets, r, 0, np.int32))
                got = (np.asarray(lp.token_ids)[:n], np.asarray(lp.logprobs)[:n], np.asarray(lp.ranks)[:n])
            ids.append(got[0][:, :k + 1])
            values.append(got[1][:, :k + 1])
            ranks.append(got[2])
        return np.concatenate(ids), np.concatenate(values), np.concatenate(ranks)

    def sample(self, hidden: StepHidden, scheduled: ScheduledTokens, sampling: SamplingBatch
               ) -> tuple[np.ndarray, Logprobs | None]:
        n = sampling.num_rows
        r = buckets.pick_bucket(self.request_buckets, n)
        raw = self.programs("logits", r, self._head(), hidden.hidden_sampled)
        logits = self._process(raw, sampling, r)
        k_max = sampling.max_num_logprobs
        tokens, lp = self.programs("sample", r, raw, logits, self._sampling_inputs(sampling, r))
        tokens = np.asarray(tokens)[:n]
        if k_max is None:
            return tokens, None
        if k_max > sampler.MAX_DEVICE_LOGPROBS:
            ids, values, ranks = sampler.host_logprobs(np.asarray(raw)[:n], tokens, k_max)
        else:
            ids = np.asarray(lp.token_ids)[:n, :k_max + 1]
            values, ranks = np.asarray(lp.logprobs)[:n, :k_max + 1], np.asarray(lp.ranks)[:n]
        return tokens, Logprobs(token_ids=ids.tolist(), logprobs=values.tolist(), ranks=ranks.tolist())

    def sample_speculative(self, hidden: StepHidden, spec: SpecDecodeBatch, sampling: SamplingBatch
                           ) -> tuple[list[list[int]], Logprobs | None]:
        """The rejection sampler: ``spec_verify`` gives each position's argmax, sample, p(draft)
        and uniform on the device, request bucket by request bucket; the host applies the
        rule (SpecDecodeBatch)."""
        n = spec.num_positions
        expanded = sampling.expand(spec.position_request, spec.position_offset, self.batch)
        draft_at = spec.draft_at_position
        parts = [self._verify(hidden, spec.logits_indices[c:c + self.max_seqs], draft_at[c:c + self.max_seqs],
                              expanded.slice(c, c + self.max_seqs), c // self.max_seqs)
                 for c in range(0, n, self.max_seqs)]
        greedy, sample, p_draft, uniform = (np.concatenate([p[i] for p in parts]) for i in range(4))
        is_greedy = expanded.temperature == 0.0
        num_accepted = spec.count_accepted(is_greedy, greedy, p_draft, uniform)
        final_pos = spec.final_positions(num_accepted)
        final = np.where(is_greedy[final_pos], greedy[final_pos], sample[final_pos])
        tokens = spec.accepted_tokens(num_accepted, final)
        k_max = expanded.max_num_logprobs
        if k_max is None:
            return tokens, None
        out_pos = spec.output_positions(num_accepted)
        targets = np.zeros(n, np.int32)
        targets[out_pos] = [t for ts in tokens for t in ts]
        ids, values, ranks = [], [], []
        for c, (*_, raw) in zip(range(0, n, self.max_seqs), parts):
            m = min(self.max_seqs, n - c)
            chunk_targets = targets[c:c + m]
            if k_max > sampler.MAX_DEVICE_LOGPROBS:
                got = sampler.host_logprobs(np.asarray(raw)[:m], chunk_targets, k_max)
            else:
                lp = self.programs("logprobs", raw.shape[0], raw, _pad(chunk_targets, raw.shape[0], 0, np.int32))
                got = (np.asarray(lp.token_ids)[:m], np.asarray(lp.logprobs)[:m], np.asarray(lp.ranks)[:m])
            ids.append(got[0][:, :k_max + 1])
            values.append(got[1][:, :k_max + 1])
            ranks.append(got[2])
        ids, values, ranks = np.concatenate(ids), np.concatenate(values), np.concatenate(ranks)
        return tokens, Logprobs(token_ids=ids[out_pos].tolist(), logprobs=values[out_pos].tolist(),
                                ranks=ranks[out_pos].tolist())

    def _verify(self, hidden: StepHidden, indices: np.ndarray, drafts: np.ndarray, s: SamplingBatch, piece: int):
        """``spec_verify`` for up to max_seqs positions, the step's ``piece``-th: (argmax,
        sample, p(draft), uniform) as numpy, and the raw logits (for logprobs)."""
        n = len(indices)
        r = buckets.pick_bucket(self.request_buckets, n)
        selected = self.programs("gather_rows", hidden.step.bucket, hidden.hidden,
                                 _pad(indices, self.max_seqs, 0, np.int32))
        raw = self.programs("logits", r, self._head(), selected)
        logits = self._process(raw, s, r)
        inputs = self._sampling_inputs(s, r)
        # Unseeded rows draw from (engine seed, step, row): each piece of the step its own keys.
        inputs = inputs._replace(step_key=np.array([inputs.step_key[0], (self.step_count * 256 + piece) % 2**32],
                                                   np.uint32))
        out = self.programs("spec_verify", r, logits, _pad(drafts, r, -1, np.int32), inputs)
        return (*(np.asarray(a)[:n] for a in out), raw)

    def _process(self, raw: jax.Array, s: SamplingBatch, r: int) -> jax.Array:
        """min_tokens and penalties (``penalize``) and grammar masks (``grammar``) on the raw
        logits of request bucket ``r``, where a row needs them."""
        logits = raw
        if not s.no_penalties or s.min_tokens:
            counts, in_prompt = self._penalty_counts(s.rows, r, s.num_draft_outputs)
            logits = self.programs(
                "penalize", r, raw, counts, in_prompt, self._min_tokens_mask(s, r),
                _pad(s.presence_penalty, r, 0.0), _pad(s.frequency_penalty, r, 0.0),
                _pad(s.repetition_penalty, r, 1.0))
        if s.allowed_bitmask is not None:
            bitmask = np.full((r, s.allowed_bitmask.shape[1]), -1, np.int32)
            bitmask[:s.num_rows] = s.allowed_bitmask
            logits = self.programs("grammar", r, logits, bitmask)
        return logits

    def _head(self) -> jax.Array:
        return self.params.get("lm_head", self.params["embed"])

    def _sampling_inputs(self, s: SamplingBatch, r: int) -> sampler.SamplingInputs:
        flags = np.array([not s.all_greedy, s.uses_min_p,
                          bool((s.top_k < self.vocab_size).any()) or s.uses_top_p, s.max_num_logprobs is not None])
        return sampler.SamplingInputs(
            temperature=_pad(s.temperature, r, 0.0), top_k=_pad(s.top_k, r, self.vocab_size, np.int32),
            top_p=_pad(s.top_p, r, 1.0), min_p=_pad(s.min_p, r, 0.0),
            seeds=_pad(s.seeds % 2**32, r, 0, np.uint32), seeded=_pad(s.seeded, r, False, bool),
            counters=_pad(s.num_output_tokens, r, 0, np.int32),
            step_key=np.array([self.config.model_config.seed % 2**32, self.step_count % 2**32], np.uint32),
            flags=flags)

    def _min_tokens_mask(self, s: SamplingBatch, r: int) -> np.ndarray:
        """[r, vocab] bool: eos and stop tokens of rows still short of min_tokens."""
        mask = np.zeros((r, self.vocab_size), bool)
        for i, stop_ids in s.min_tokens.items():
            mask[i, stop_ids] = True
        return mask

    def _penalty_counts(self, rows: np.ndarray, r: int, extra: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Output token counts [r, vocab] and prompt membership [r, vocab] of the sampled rows
        (``extra``: draft tokens each row counts as output, speculative decoding)."""
        batch, v = self.batch, self.vocab_size
        width = v + 1  # column v collects the padding

        def per_row(ids: np.ndarray) -> np.ndarray:
            flat = (np.arange(len(rows))[:, None] * width + ids).ravel()
            out = np.zeros((r, width), np.int32)
            out[:len(rows)] = np.bincount(flat, minlength=len(rows) * width).reshape(len(rows), width)
            return out[:, :v]

        counts = per_row(batch.padded_token_ids(rows, outputs=True, pad=v, extra=extra))
        in_prompt = per_row(batch.padded_token_ids(rows, outputs=False, pad=v)) > 0
        return counts, in_prompt


def _pad(values: np.ndarray, size: int, fill, dtype=np.float32) -> np.ndarray:
    out = np.full(size, fill, dtype)
    out[:len(values)] = values
    return out

"""JaxModelRunner: the TPU platform's model runner, the JAX twin of TorchModelRunner.

Each step: apply the scheduler's diff to the persistent InputBatch (numpy), build the
step's inputs padded to their buckets (step_inputs), run the compiled forward program of
the token bucket, then the logits/penalty/sampling programs of the request bucket, and
return the sampled ids and logprobs. Nothing on the hot path compiles: every program is
built in ``warm_up`` and a RecompileDetector turns any later compilation into an error.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from piston.config import EngineConfig
from piston.core.scheduler_output import SchedulerOutput
from piston.engine.messages import Logprobs
from piston.worker.input_batch import CachedRequestState, InputBatch
from piston.worker.runner_output import ModelRunnerOutput
from piston_tpu import buckets, sampler
from piston_tpu.attention import choose_attention, make_attention, page_table_multiple
from piston_tpu.compilation_cache import enable_compilation_cache
from piston_tpu.kv_cache import kv_cache_shape
from piston_tpu.model import LlamaSpec
from piston_tpu.programs import ModelPrograms
from piston_tpu.recompile_detector import RecompileDetector
from piston_tpu.rope import rope_tables
from piston_tpu.step_inputs import StepInputBuilder, StepInputs
from piston_tpu.weights import load_params

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))

_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class JaxModelRunner:
    def __init__(self, config: EngineConfig, on_tpu: bool) -> None:
        self.config = config
        self.on_tpu = on_tpu
        mc, sc = config.model_config, config.scheduler_config
        if mc.dtype not in _DTYPES:
            raise ValueError(f"dtype={mc.dtype!r} is not supported on the TPU platform; use one of {tuple(_DTYPES)}.")
        self.dtype = np.dtype(_DTYPES[mc.dtype])
        self.spec = LlamaSpec.from_hf_config(mc.hf_config)
        self.vocab_size = self.spec.vocab_size
        self.block_size = config.cache_config.block_size
        self.max_model_len = mc.max_model_len
        self.token_buckets = buckets.token_buckets(sc.max_num_batched_tokens)
        self.request_buckets = buckets.request_buckets(sc.max_num_seqs)
        self.max_seqs = self.request_buckets[-1]
        max_blocks = -(-self.max_model_len // self.block_size)
        multiple = page_table_multiple(self.block_size)
        self.pages_per_seq = -(-max_blocks // multiple) * multiple
        self.batch = InputBatch(sc.max_num_seqs, self.max_model_len, max_blocks)
        self.attention_name = choose_attention(self.spec.num_layers, on_tpu)
        # float32 runs must not drop to bf16 matmul passes on a TPU.
        self.precision = lax.Precision.HIGHEST if self.dtype == np.float32 else None
        self.params: dict[str, jax.Array] = {}
        self.rope: tuple[jax.Array, jax.Array] | None = None
        self.rotary_dim = 0
        self.kv_cache: jax.Array | None = None
        self.num_blocks = 0
        self.programs: ModelPrograms | None = None
        self.inputs: StepInputBuilder | None = None
        self.detector = RecompileDetector().__enter__()
        self.step_count = 0

    # ----- set-up -----------------------------------------------------------------

    def load_model(self) -> None:
        start = time.perf_counter()
        mc = self.config.model_config
        params = load_params(self.spec, mc, mc.hf_config, self.dtype)
        self.params = {name: jnp.asarray(array) for name, array in params.items()}
        tables = rope_tables(mc.hf_config, self.spec.head_dim, self.max_model_len)
        self.rope = (jnp.asarray(tables.cos), jnp.asarray(tables.sin))
        self.rotary_dim = tables.rotary_dim
        num_params = sum(int(np.prod(p.shape)) for p in self.params.values())
        logger.info("Loaded %s (%s, JAX) in %.2f s: %.1fM parameters in %s on %s; attention: %s%s.",
                    mc.path or mc.model, self.spec.architecture, time.perf_counter() - start, num_params / 1e6,
                    mc.dtype, jax.devices()[0].platform, self.attention_name,
                    "" if self.on_tpu or self.attention_name == "xla" else " (Pallas interpret mode)")

    def kv_cache_bytes_per_block(self) -> int:
        s = self.spec
        return 2 * self.block_size * s.num_kv_heads * s.head_dim * self.dtype.itemsize * s.num_layers

    def initialize_kv_cache(self, num_blocks: int) -> None:
        s = self.spec
        self.num_blocks = num_blocks
        # Zeros: padded reads of unused slots must be finite so masking can remove them.
        self.kv_cache = jnp.zeros(kv_cache_shape(s.num_layers, num_blocks, self.block_size, s.num_kv_heads,
                                                 s.head_dim), self.dtype)
        self.inputs = StepInputBuilder(self.batch, self.block_size, num_blocks * self.block_size, self.max_seqs,
                                       self.pages_per_seq)

    def release_kv_cache(self) -> None:
        self.kv_cache = None

    def close(self) -> None:
        """Drop the device buffers and stop listening for compilations."""
        self.detector.__exit__(None, None, None)
        self.kv_cache = None
        self.params = {}

    def warm_up(self) -> None:
        """Compile every program for every bucket, then arm the recompile detector."""
        if self.programs is None:
            folder = enable_compilation_cache(self.config.compilation_config.cache_dir)
            if folder:
                logger.info("XLA programs are cached in %s.", folder)
            attention = make_attention(self.attention_name, self.spec.head_dim ** -0.5, self.on_tpu,
                                       self.block_size, self.precision)
            self.programs = ModelPrograms(self.spec, attention, self.rotary_dim, self.token_buckets,
                                          self.request_buckets, self.max_seqs, self.pages_per_seq, self.precision)
            self.programs.compile_all(self.params, self.rope, self.kv_cache)
        self.detector.arm()

    # ----- one step ---------------------------------------------------------------

    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.batch
        for req_id in so.finished_req_ids:
            batch.remove_request(req_id)
        cached = so.scheduled_cached_reqs
        for req_id, new_blocks, computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            row = batch.req_id_to_row[req_id]
            batch.append_block_ids(row, new_blocks)
            batch.num_computed_tokens[row] = computed
        batch.condense()
        for new in so.scheduled_new_reqs:
            # Seeded draws are keyed by (seed, tokens generated): a resumed request needs no replay.
            state = CachedRequestState(new.req_id, new.prompt_token_ids, new.sampling_params, new.eos_token_id, None)
            batch.add_request(state, new.output_token_ids, new.block_ids, new.num_computed_tokens)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        self.step_count += 1
        step = self.inputs.build(so, lambda n: buckets.pick_bucket(self.token_buckets, n))
        batch = self.batch
        end = batch.num_computed_tokens[step.rows] + step.num_scheduled
        sampling = np.flatnonzero(end >= batch.num_tokens[step.rows])
        sample_idx = np.zeros(self.max_seqs, np.int32)
        sample_idx[:len(sampling)] = step.query_start[1:][sampling] - 1
        hidden, hidden_sampled, self.kv_cache = self.programs(
            "forward", step.bucket, self.params, self.rope, self.kv_cache, step.input_ids, step.positions,
            step.metadata, sample_idx)

        prompt_logprobs = self._prompt_logprobs(step, hidden)
        chunk_only = []
        if prompt_logprobs:
            sampled_ids = {batch.req_ids[r] for r in step.rows[sampling].tolist()}
            chunk_only = [r for r in prompt_logprobs if r not in sampled_ids]
        if len(sampling) == 0:
            self.detector.check("a prefill step")
            return ModelRunnerOutput(req_ids=chunk_only, sampled_token_ids=[[] for _ in chunk_only],
                                     prompt_logprobs=prompt_logprobs)
        sample_rows = step.rows[sampling]
        tokens, logprobs = self._sample(sample_rows, hidden_sampled)
        req_ids = []
        for row, token in zip(sample_rows.tolist(), tokens):
            batch.append_token(row, token)
            req_ids.append(batch.req_ids[row])
        self.detector.check(f"step {self.step_count}")
        return ModelRunnerOutput(req_ids=req_ids + chunk_only,
                                 sampled_token_ids=[[t] for t in tokens] + [[] for _ in chunk_only],
                                 logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    # ----- sampling ---------------------------------------------------------------

    def _sample(self, rows: np.ndarray, hidden_sampled: jax.Array) -> tuple[list[int], Logprobs | None]:
        batch, n = self.batch, len(rows)
        r = buckets.pick_bucket(self.request_buckets, n)
        raw = self.programs("logits", r, self._head(), hidden_sampled)
        states = [batch.states[i] for i in rows.tolist()]
        params = [s.sampling_params for s in states]
        logits = raw
        forbidden = self._min_tokens_mask(states, r)
        penalized = any(p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1
                        for p in params)
        if penalized or forbidden is not None:
            counts, in_prompt = self._penalty_counts(rows, r)
            logits = self.programs(
                "penalize", r, raw, counts, in_prompt,
                forbidden if forbidden is not None else np.zeros((r, self.vocab_size), bool),
                self._pad(batch.presence_penalty[rows], r, 0.0), self._pad(batch.frequency_penalty[rows], r, 0.0),
                self._pad(batch.repetition_penalty[rows], r, 1.0))
        k_max = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        inputs = self._sampling_inputs(rows, states, r, k_max)
        tokens, lp = self.programs("sample", r, raw, logits, inputs)
        tokens = np.asarray(tokens)[:n]
        if k_max is None:
            return tokens.tolist(), None
        if k_max > sampler.MAX_DEVICE_LOGPROBS:
            ids, values, ranks = sampler.host_logprobs(np.asarray(raw)[:n], tokens, k_max)
        else:
            ids = np.asarray(lp.token_ids)[:n, :k_max + 1]
            values, ranks = np.asarray(lp.logprobs)[:n, :k_max + 1], np.asarray(lp.ranks)[:n]
        return tokens.tolist(), Logprobs(token_ids=ids.tolist(), logprobs=values.tolist(), ranks=ranks.tolist())

    def _head(self) -> jax.Array:
        return self.params.get("lm_head", self.params["embed"])

    @staticmethod
    def _pad(values: np.ndarray, size: int, fill, dtype=np.float32) -> np.ndarray:
        out = np.full(size, fill, dtype)
        out[:len(values)] = values
        return out

    def _sampling_inputs(self, rows, states, r: int, k_max: int | None) -> sampler.SamplingInputs:
        batch = self.batch
        temperature = batch.temperature[rows]
        top_k = np.where(batch.top_k[rows] == 0, self.vocab_size, batch.top_k[rows])
        top_p, min_p = batch.top_p[rows], batch.min_p[rows]
        seeds = [s.sampling_params.seed for s in states]
        flags = np.array([bool((temperature > 0).any()), bool((min_p > 0).any()),
                          bool((top_k < self.vocab_size).any() or (top_p < 1).any()), k_max is not None])
        return sampler.SamplingInputs(
            temperature=self._pad(temperature, r, 0.0), top_k=self._pad(top_k, r, self.vocab_size, np.int32),
            top_p=self._pad(top_p, r, 1.0), min_p=self._pad(min_p, r, 0.0),
            seeds=self._pad([(s or 0) % 2**32 for s in seeds], r, 0, np.uint32),
            seeded=self._pad([s is not None for s in seeds], r, False, bool),
            counters=self._pad([len(s.output_token_ids) for s in states], r, 0, np.int32),
            step_key=np.array([self.config.model_config.seed % 2**32, self.step_count % 2**32], np.uint32),
            flags=flags)

    def _min_tokens_mask(self, states, r: int) -> np.ndarray | None:
        """[r, vocab] bool: eos and stop tokens of rows still short of min_tokens; None if none."""
        mask = None
        for i, s in enumerate(states):
            p = s.sampling_params
            if len(s.output_token_ids) >= p.min_tokens:
                continue
            stop_ids = set(p.stop_token_ids or ())
            if s.eos_token_id is not None and not p.ignore_eos:
                stop_ids.add(s.eos_token_id)
            stop_ids = [t for t in stop_ids if t < self.vocab_size]
            if stop_ids:
                mask = np.zeros((r, self.vocab_size), bool) if mask is None else mask
                mask[i, stop_ids] = True
        return mask

    def _penalty_counts(self, rows: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Output token counts [r, vocab] and prompt membership [r, vocab] of the sampled rows."""
        batch = self.batch
        counts = np.zeros((r, self.vocab_size), np.int32)
        in_prompt = np.zeros((r, self.vocab_size), bool)
        for i, row in enumerate(rows.tolist()):
            n_prompt, n_total = int(batch.num_prompt_tokens[row]), int(batch.num_tokens[row])
            in_prompt[i, batch.token_ids[row, :n_prompt]] = True
            counts[i] = np.bincount(batch.token_ids[row, n_prompt:n_total], minlength=self.vocab_size)
        return counts, in_prompt

    # ----- prompt logprobs --------------------------------------------------------

    def _prompt_logprobs(self, step: StepInputs, hidden: jax.Array) -> dict[str, Logprobs]:
        """Logprobs of the prompt tokens this step's chunk predicts, for requests that ask."""
        batch = self.batch
        wanted = []  # (req_id, k, first hidden row, targets)
        for i, row in enumerate(step.rows.tolist()):
            k = batch.states[row].sampling_params.prompt_logprobs
            if k is None:
                continue
            start = int(batch.num_computed_tokens[row])
            # Position p predicts prompt token p + 1; the last prompt position predicts output.
            stop = min(start + int(step.num_scheduled[i]), int(batch.num_prompt_tokens[row]) - 1)
            if stop > start:
                wanted.append((batch.req_ids[row], k, int(step.query_start[i]),
                               batch.token_ids[row, start + 1:stop + 1].astype(np.int32)))
        if not wanted:
            return {}
        hidden_rows = np.concatenate([np.arange(q0, q0 + len(t), dtype=np.int32) for _, _, q0, t in wanted])
        targets = np.concatenate([t for *_, t in wanted])
        k_max = max(k for _, k, _, _ in wanted)
        ids, values, ranks = [], [], []
        for c in range(0, len(targets), self.max_seqs):
            chunk_rows, chunk_targets = hidden_rows[c:c + self.max_seqs], targets[c:c + self.max_seqs]
            n = len(chunk_rows)
            r = buckets.pick_bucket(self.request_buckets, n)
            selected = self.programs("gather_rows", step.bucket, hidden,
                                     self._pad(chunk_rows, self.max_seqs, 0, np.int32))
            logits = self.programs("logits", r, self._head(), selected)
            if k_max > sampler.MAX_DEVICE_LOGPROBS:
                got = sampler.host_logprobs(np.asarray(logits)[:n], chunk_targets, k_max)
            else:
                lp = self.programs("logprobs", r, logits, self._pad(chunk_targets, r, 0, np.int32))
                got = (np.asarray(lp.token_ids)[:n], np.asarray(lp.logprobs)[:n], np.asarray(lp.ranks)[:n])
            ids.append(got[0])
            values.append(got[1])
            ranks.append(got[2])
        ids, values, ranks = np.concatenate(ids), np.concatenate(values), np.concatenate(ranks)
        result, offset = {}, 0
        for req_id, k, _, t in wanted:
            part = slice(offset, offset + len(t))
            result[req_id] = Logprobs(token_ids=ids[part, :k + 1].tolist(), logprobs=values[part, :k + 1].tolist(),
                                      ranks=ranks[part].tolist())
            offset += len(t)
        return result

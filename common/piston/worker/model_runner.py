"""TorchModelRunner: the torch runner base shared by the CPU and CUDA platforms.

Each step: apply the scheduler's diff to the persistent batch, build the flattened
inputs with numpy, run the model inside a forward context, sample the requests that
reached the end of their tokens, and return the sampled ids and logprobs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from piston.attention.backend import AttentionImpl
from piston.attention.layer import attention_layers
from piston.attention.metadata import CommonAttentionMetadata
from piston.compilation.capture import CaptureStrategy, dummy_decode_metadata
from piston.compilation.compiled_model import CompiledModel, capture_graphs, compile_model
from piston.config import EngineConfig
from piston.core.scheduler_output import SchedulerOutput
from piston.distributed.parallel_state import get_tp_rank, get_tp_size, head_partition
from piston.engine.messages import Logprobs
from piston.forward_context import ForwardContext, set_forward_context
from piston.model_executor.sampler import Sampler, compute_logprobs, gather_logprobs
from piston.model_executor.sampling_metadata import SamplingMetadata
from piston.worker.input_batch import CachedRequestState, InputBatch
from piston.worker.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)


class TorchModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device, attn_impl: AttentionImpl) -> None:
        self.config = config
        self.device = device
        self.attn_impl = attn_impl
        mc = config.model_config
        self.dtype = getattr(torch, mc.dtype)
        hf = mc.hf_config
        self.num_layers = hf.num_hidden_layers
        total_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        # This rank's KV heads: the cache holds only those (split or replicated over TP ranks).
        self.num_kv_heads = head_partition(hf.num_attention_heads, total_kv_heads, get_tp_size(),
                                           get_tp_rank()).num_kv_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.vocab_size = hf.vocab_size
        self.block_size = config.cache_config.block_size
        self.max_model_len = mc.max_model_len
        max_blocks = -(-self.max_model_len // self.block_size)
        self.batch = InputBatch(config.scheduler_config.max_num_seqs, self.max_model_len, max_blocks)
        self.sampler = Sampler()
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.attn_layers: dict = {}
        # piston.compilation: the worker may set these two before load_model: the strategy
        # that runs the compiled pieces (None: run them as they are) and what compilation
        # mode "auto" means on its platform. ``compiled`` is None when the model runs eagerly.
        self.capture_strategy: CaptureStrategy | None = None
        self.default_compilation_mode = "eager"
        self.compiled: CompiledModel | None = None

    # ----- set-up -----------------------------------------------------------------

    def load_model(self) -> None:
        from piston.model_executor.model_loader import load_model

        self.model = load_model(self.config.model_config, device=self.device)
        self.attn_layers = attention_layers(self.model)
        self.compiled = compile_model(self.model, self.config, self.device, self.attn_layers,
                                      self.capture_strategy, self.default_compilation_mode)

    def capture_model(self) -> None:
        """Capture graphs for every capture size (after initialize_kv_cache); a no-op when the
        model runs eagerly or the strategy captures nothing."""
        if self.compiled is not None:
            capture_graphs(self.compiled, self._dummy_decode_forward)

    def _dummy_decode_forward(self, num_tokens: int) -> None:
        """One compiled forward pass of ``num_tokens`` one-token sequences that all live in
        block 0 (warm-up and capture run before any request owns a block)."""
        common = dummy_decode_metadata(num_tokens, self.block_size, self.device)
        ids, positions = self._to_device(np.zeros(num_tokens, dtype=np.int64), np.zeros(num_tokens, dtype=np.int64))
        ctx = ForwardContext(self.attn_impl.build_metadata(common), self.kv_caches, self.attn_impl,
                             self.attn_layers)
        self._flush_to_device()
        with set_forward_context(ctx):
            self.compiled(ids, positions)

    def kv_cache_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem * self.num_layers

    def initialize_kv_cache(self, num_blocks: int) -> None:
        shape = self.attn_impl.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads,
                                              self.head_dim)
        # Zeros: padded reads of unused slots must be finite so masking can remove them.
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.num_layers)]

    # ----- host-to-device copies (an accelerator runner overrides these) ----------------

    def _to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """The host arrays as tensors on the device, in order. The base copies each one now
        (nothing at all on the CPU); a runner may instead stage them and copy them together
        at the next ``_flush_to_device``, so the tensors must not be read before it."""
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]

    def _flush_to_device(self) -> None:
        """Issue the copies ``_to_device`` deferred (none in the base runner)."""

    # ----- one step ---------------------------------------------------------------

    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.batch
        for req_id in so.finished_req_ids:
            batch.remove_request(req_id)
        cached = so.scheduled_cached_reqs
        for req_id, new_blocks, computed in zip(cached.req_ids, cached.new_block_ids,
                                                cached.num_computed_tokens):
            row = batch.req_id_to_row[req_id]
            batch.append_block_ids(row, new_blocks)
            batch.num_computed_tokens[row] = computed
        batch.condense()
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            gen = None
            if params.seed is not None and not params.greedy:
                gen = torch.Generator(device=self.device).manual_seed(params.seed)
                # A resumed request replays its draws so seeded output survives preemption.
                for _ in new.output_token_ids:
                    torch.empty(self.vocab_size, device=self.device).exponential_(generator=gen)
            state = CachedRequestState(new.req_id, new.prompt_token_ids, params,
                                       new.eos_token_id, gen)
            batch.add_request(state, new.output_token_ids, new.block_ids, new.num_computed_tokens)

    def _prepare_inputs(self, so: SchedulerOutput):
        batch = self.batch
        st = batch.schedule(so.num_scheduled_tokens, self.block_size)
        rows, num_sched, cu, computed, positions = (st.rows, st.num_scheduled, st.cu_num_scheduled,
                                                    st.num_computed, st.positions)
        total = st.num_tokens
        input_ids = batch.token_ids[st.token_rows, positions]
        slot_mapping = st.block_numbers.astype(np.int64) * self.block_size + positions % self.block_size
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int32)
        query_start_loc[1:] = cu
        seq_lens = (computed + num_sched).astype(np.int32)
        max_blocks = int(batch.num_blocks[rows].max())
        qsl_t, seq_lens_t, block_table_t, slot_mapping_t, input_ids_t, positions_t = self._to_device(
            query_start_loc, seq_lens, batch.block_table[rows, :max_blocks], slot_mapping, input_ids, positions)
        common = CommonAttentionMetadata(
            num_reqs=len(rows), num_actual_tokens=total, max_query_len=int(num_sched.max()),
            max_seq_len=int(seq_lens.max()), query_start_loc_np=query_start_loc,
            seq_lens_np=seq_lens, query_start_loc=qsl_t, seq_lens=seq_lens_t,
            block_table=block_table_t, slot_mapping=slot_mapping_t,
            block_size=self.block_size, num_common_prefix_blocks=so.num_common_prefix_blocks)
        return rows, num_sched, common, (input_ids_t, positions_t)

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        rows, num_sched, common, (input_ids, positions) = self._prepare_inputs(so)
        ctx = ForwardContext(self.attn_impl.build_metadata(common), self.kv_caches, self.attn_impl,
                             self.attn_layers)
        self._flush_to_device()
        model = self.model if self.compiled is None else self.compiled  # pads to a capture size itself
        with set_forward_context(ctx):
            hidden = model(input_ids, positions)

        batch = self.batch
        end = batch.num_computed_tokens[rows] + num_sched
        prompt_logprobs = self._prompt_logprobs(rows, num_sched, common.query_start_loc_np, hidden)
        sampling = np.flatnonzero(end >= batch.num_tokens[rows])
        # Chunks that sampled nothing but have prompt logprobs ride after the sampled rows,
        # so logprobs row i still belongs to req_ids[i].
        chunk_only = []
        if prompt_logprobs:
            sampled_ids = {batch.req_ids[r] for r in rows[sampling].tolist()}
            chunk_only = [r for r in prompt_logprobs if r not in sampled_ids]
        if len(sampling) == 0:
            return ModelRunnerOutput(req_ids=chunk_only, sampled_token_ids=[[] for _ in chunk_only],
                                     prompt_logprobs=prompt_logprobs)
        sample_rows = rows[sampling]
        (logits_idx,) = self._to_device(common.query_start_loc_np[1:][sampling].astype(np.int64) - 1)
        sampling_metadata = self._sampling_metadata(sample_rows)
        self._flush_to_device()
        logits = self.model.compute_logits(hidden[logits_idx])
        out = self.sampler(logits, sampling_metadata)
        sampled = out.sampled_token_ids.tolist()
        req_ids = []
        for row, token in zip(sample_rows.tolist(), sampled):
            batch.append_token(row, token)
            req_ids.append(batch.req_ids[row])
        return ModelRunnerOutput(
            req_ids=req_ids + chunk_only,
            sampled_token_ids=[[t] for t in sampled] + [[] for _ in chunk_only],
            logprobs=out.logprobs.tolists() if out.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs)

    def _sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        batch = self.batch
        states = [batch.states[r] for r in rows.tolist()]
        temperature = batch.temperature[rows]
        top_p, top_k, min_p = batch.top_p[rows], batch.top_k[rows], batch.min_p[rows]
        presence = batch.presence_penalty[rows]
        frequency = batch.frequency_penalty[rows]
        repetition = batch.repetition_penalty[rows]
        no_penalties = bool((presence == 0).all() and (frequency == 0).all() and (repetition == 1).all())
        prompt_ids = None
        if not no_penalties:
            max_prompt = int(batch.num_prompt_tokens[rows].max())
            padded = np.full((len(rows), max_prompt), self.vocab_size, dtype=np.int64)
            for i, r in enumerate(rows.tolist()):
                n = batch.num_prompt_tokens[r]
                padded[i, :n] = batch.token_ids[r, :n]
            (prompt_ids,) = self._to_device(padded)
        min_tokens = {}
        generators = {}
        k_max = None
        for i, s in enumerate(states):
            p = s.sampling_params
            if s.generator is not None:
                generators[i] = s.generator
            if p.logprobs is not None:
                k_max = max(k_max or 0, p.logprobs)
            if len(s.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids or ())
                if s.eos_token_id is not None and not p.ignore_eos:
                    stop_ids.add(s.eos_token_id)
                if stop_ids:
                    min_tokens[i] = stop_ids
        greedy = temperature == 0.0

        def t(a):
            return self._to_device(a)[0]

        return SamplingMetadata(
            temperature=t(temperature), all_greedy=bool(greedy.all()), all_random=bool((~greedy).all()),
            top_p=None if (top_p >= 1.0).all() else t(top_p),
            top_k=None if (top_k == 0).all() else t(np.where(top_k == 0, self.vocab_size, top_k)),
            min_p=None if (min_p == 0).all() else t(min_p),
            generators=generators, max_num_logprobs=k_max, no_penalties=no_penalties,
            presence_penalties=t(presence), frequency_penalties=t(frequency),
            repetition_penalties=t(repetition), prompt_token_ids=prompt_ids,
            output_token_ids=[s.output_token_ids for s in states], min_tokens=min_tokens)

    def _prompt_logprobs(self, rows, num_sched, query_start_loc, hidden) -> dict[str, Logprobs]:
        """Logprobs of the prompt tokens this step's chunk predicts, for requests that ask."""
        batch = self.batch
        result: dict[str, Logprobs] = {}
        for i, row in enumerate(rows.tolist()):
            k = batch.states[row].sampling_params.prompt_logprobs
            if k is None:
                continue
            start = int(batch.num_computed_tokens[row])
            # Position p predicts prompt token p + 1; the last prompt position predicts output.
            stop = min(start + int(num_sched[i]), int(batch.num_prompt_tokens[row]) - 1)
            if stop <= start:
                continue
            q0 = int(query_start_loc[i])
            logits = self.model.compute_logits(hidden[q0:q0 + stop - start])
            targets = torch.from_numpy(batch.token_ids[row, start + 1:stop + 1].copy()).to(self.device)
            result[batch.req_ids[row]] = gather_logprobs(compute_logprobs(logits), k, targets).tolists()
        return result

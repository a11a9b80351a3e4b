"""ModelRunner: the step every platform's model runner takes, in numpy.

``execute_model`` is the whole step, the same on every platform:

1. apply the scheduler's diff to the persistent InputBatch (``on_new_request`` lets a
   platform attach state to a new request);
2. flatten the step's tokens and choose the requests that sample (those whose tokens this
   step reach the end of what they hold);
3. ``forward``: the platform's device inputs and model call;
4. prompt logprobs for the prompt positions this chunk predicts (``prompt_logprobs``
   computes them on the device);
5. ``sample``: the platform's sampler, given the sampled rows' SamplingBatch;
6. append the sampled tokens to the batch and assemble the ModelRunnerOutput.

A platform's runner implements only ``forward``, ``prompt_logprobs`` and ``sample``
(plus its own set-up: loading weights, the KV cache, warm-up).

With speculative decoding (``EngineConfig.speculative_config``) the scheduler's drafts are
written after each request's tokens before step 2, step 5 is ``sample_speculative`` (a
rejection sampler over every draft position, SpecDecodeBatch), a request may append
several tokens, and the proposer drafts the next step's tokens after step 6 (a draft
model through the platform's ``draft_forward``).

Faults: an exception in a stage that serves named requests becomes a RequestFailedError
naming them (a new request's set-up: that request; the forward pass: the step's requests;
sampling: the sampled ones), so the engine fails those alone and runs on. Running out of
memory, or a batch that no longer matches the scheduler, is not a request's fault and
propagates as it is.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Iterator

import msgspec
import numpy as np

from piston.step.config import EngineConfig, cdiv
from piston.step.fault_injection import faulty, maybe_stall
from piston.step.input_batch import InputBatch, RunnerRequestState, ScheduledTokens
from piston.step.kv_cache_layout import kv_cache_layout
from piston.step.kv_transfer import KVTierStore, KVTransfer, store_class, tier_directory
from piston.step.lora_adapter import LoRAAdapter, LoRAModelDims
from piston.step.lora_request import LoRARequest
from piston.step.lora_slots import LoRASlots
from piston.step.runner_output import (EMPTY_MODEL_RUNNER_OUTPUT, Logprobs, ModelRunnerOutput,
                                       RequestFailedError)
from piston.step.sampling_batch import SamplingBatch
from piston.step.scheduler_output import NewRequestData, SchedulerOutput
from piston.step.spec_decode import SpecDecodeBatch


class ModelRunner(abc.ABC):
    def __init__(self, config: EngineConfig) -> None:
        mc, sc = config.model_config, config.scheduler_config
        self.config = config
        self.vocab_size = mc.vocab_size
        self.block_size = config.cache_config.block_size
        self.max_model_len = mc.max_model_len
        # How the layers share the KV cache: one block table, or one per group of layers.
        self.kv_layout = kv_cache_layout(config)
        self.batch = InputBatch(sc.max_num_seqs, self.max_model_len, cdiv(self.max_model_len, self.block_size),
                                self.kv_layout.num_groups)
        self.kv_store: KVTierStore | None = None  # the KV offload tier's blocks (enable_kv_offload)
        spec = config.speculative_config
        self.proposer = None
        self.spec_disable_batch_size = 0
        if spec is not None:
            from piston.step.proposer import make_proposer

            if spec.uses_draft_model:
                from piston.step.draft_proposer import DraftModelProposer

                self.proposer = DraftModelProposer(spec, self.draft_forward, self.block_size, self.max_model_len,
                                                   sc.max_num_batched_tokens)
            else:
                self.proposer = make_proposer(spec)
            self.proposer_k = spec.num_speculative_tokens
            self.spec_disable_batch_size = spec.disable_by_batch_size or 0
        # Multi-LoRA (piston.step.lora_slots): adapters in host memory and the device slots
        # the platform's ``write_lora_slot`` fills.
        self.lora: LoRASlots | None = None
        if config.lora_config is not None:
            self.lora = LoRASlots(config.lora_config, LoRAModelDims.from_hf_config(mc.hf_config),
                                  self.write_lora_slot)

    def enable_kv_offload(self, rank: int = 0) -> None:
        """Keep this rank's offloaded KV blocks (the worker calls it when the tier is on)."""
        if self.kv_store is None:
            cls = store_class(self.config.cache_config.kv_offloading_backend)
            self.kv_store = cls(tier_directory(self.config), rank)

    # ----- what a platform implements -------------------------------------------------

    def on_new_request(self, state: RunnerRequestState, new: NewRequestData) -> None:
        """A request entered the batch (new, or resumed after preemption with
        ``new.output_token_ids`` already generated)."""

    @abc.abstractmethod
    def forward(self, scheduled: ScheduledTokens, scheduler_output: SchedulerOutput) -> Any:
        """Build the step's device inputs from ``scheduled`` and run the model; returns the
        hidden states of every scheduled token in the platform's own form."""

    @abc.abstractmethod
    def prompt_logprobs(self, hidden: Any, token_indices: np.ndarray, targets: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logprobs of ``targets`` [N] predicted by the hidden states at ``token_indices`` [N]:
        (token ids [N, k + 1], logprobs [N, k + 1], ranks [N]); column 0 is the target,
        then the k most likely tokens (see Logprobs)."""

    @abc.abstractmethod
    def sample(self, hidden: Any, scheduled: ScheduledTokens, sampling: SamplingBatch
               ) -> tuple[np.ndarray, Logprobs | None]:
        """One token per sampled request (hidden rows ``scheduled.logits_indices``), and
        their logprobs when ``sampling.max_num_logprobs`` is set (rows of k_max + 1)."""

    def sample_speculative(self, hidden: Any, spec: SpecDecodeBatch, sampling: SamplingBatch
                           ) -> tuple[list[list[int]], Logprobs | None]:
        """Speculative decoding's sampler (platforms with ``supports_speculative``): for each
        sampled request, its accepted drafts and one more token, chosen from the hidden rows
        ``spec.logits_indices`` so that greedy requests get exactly the target's greedy
        tokens and sampled ones the target's distribution; logprobs (rows of k_max + 1) for
        every returned token, in order, when ``sampling.max_num_logprobs`` is set."""
        raise NotImplementedError(f"{type(self).__name__} has no speculative decoding.")

    def draft_forward(self, scheduled: ScheduledTokens, hidden: Any = None,
                      hidden_index: np.ndarray | None = None) -> np.ndarray:
        """Speculative decoding by a draft model (a platform's ``draft_methods``):
        run the draft model over ``scheduled`` (its KV cache layers share the target's
        blocks) and return the argmax of its logits at each of ``scheduled.logits_indices``
        (piston.step.draft_proposer decides the passes). An EAGLE head
        reads the token after each position, and the features ``hidden[hidden_index]``
        (``hidden``: the target's hidden states of the step, as ``forward`` returned them;
        None: the head's outputs at the last pass's ``logits_indices``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run a draft model.")

    def write_lora_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Multi-LoRA (platforms with ``supports_lora``): copy ``adapter``'s matrices (this
        rank's shard of each) into device slot ``slot`` of every LoRA layer, zeros where the
        adapter leaves a module out; None clears the slot."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve LoRA adapters.")

    def set_lora_mapping(self, token_slots: np.ndarray) -> None:
        """Multi-LoRA: the next ``forward``'s tokens' slots, int32 [num_tokens] (-1: the base
        model alone)."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve LoRA adapters.")

    # ----- LoRA adapters (the engine's add_lora / remove_lora, through the workers) ----------

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read an adapter into host memory (checking it); LoRAAdapterError if it cannot be
        served."""
        if self.lora is None:
            raise ValueError("LoRA adapters are off: start the engine with enable_lora=True (--enable-lora).")
        self.lora.add(msgspec.convert(lora_request, LoRARequest) if not isinstance(lora_request, LoRARequest)
                      else lora_request)
        return True

    def remove_lora(self, lora_int_id: int, in_use: bool = True) -> bool:
        """Forget an adapter; with ``in_use`` (the engine's unfinished requests use it) only
        once the requests of this batch that use it are gone."""
        if self.lora is None:
            return False
        return self.lora.remove(lora_int_id, in_use=in_use and lora_int_id in self._loras_in_use())

    def list_loras(self) -> list[int]:
        return [] if self.lora is None else self.lora.loaded_ids()

    def _loras_in_use(self) -> set[int]:
        return {s.lora_request.lora_int_id for s in self.batch.states
                if s is not None and s.lora_request is not None}

    def apply_kv_transfer(self, transfer: KVTransfer | list) -> None:
        """Carry out offload orders outside a step (the engine's last ones, at shutdown)."""
        if self.kv_store is not None and self.kv_caches_ready():
            self.kv_store.apply(msgspec.convert(transfer, KVTransfer), self.read_kv_blocks, self.write_kv_blocks)

    def clear_kv_offload(self) -> None:
        if self.kv_store is not None:
            self.kv_store.clear()

    def close_kv_offload(self) -> None:
        """Finish the disk tier's writes (at shutdown)."""
        if self.kv_store is not None:
            self.kv_store.close()

    def kv_caches_ready(self) -> bool:
        """Whether the KV cache is allocated (not dropped by sleep)."""
        return True

    def read_kv_blocks(self, block_ids: np.ndarray) -> np.ndarray:
        """The KV cache's blocks ``block_ids`` (every layer) as raw bytes, uint8
        [len(block_ids), bytes per block] (platforms with supports_kv_offload)."""
        raise NotImplementedError(f"{type(self).__name__} cannot move KV blocks to the offload tier.")

    def write_kv_blocks(self, block_ids: np.ndarray, data: np.ndarray) -> None:
        """Write ``data`` (as ``read_kv_blocks`` returns it) into blocks ``block_ids``."""
        raise NotImplementedError(f"{type(self).__name__} cannot move KV blocks from the offload tier.")

    # ----- the step ---------------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        batch = self.batch
        if scheduler_output.kv_transfer is not None:  # before any block is written
            self.kv_store.apply(scheduler_output.kv_transfer, self.read_kv_blocks, self.write_kv_blocks)
        new_states = batch.apply_diff(scheduler_output)
        for state, new in zip(new_states, scheduler_output.scheduled_new_reqs):
            with blame([new.req_id], "setting up the request"):
                if new.lora_request is not None:
                    if self.lora is None:
                        raise ValueError("the request names a LoRA adapter, but LoRA is off (--enable-lora).")
                    self.lora.add(new.lora_request)
                self.on_new_request(state, new)
        if self.lora is not None and self.lora.removed:
            self.lora.release_unused(self._loras_in_use())
        spec = scheduler_output.scheduled_spec_decode_tokens
        if spec:
            batch.write_drafts(spec)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        step_ids = list(scheduler_output.num_scheduled_tokens)
        _inject("runner", step_ids)
        maybe_stall([new.req_id for new in scheduler_output.scheduled_new_reqs])
        scheduled = batch.schedule(scheduler_output.num_scheduled_tokens, self.block_size)
        if self.lora is not None:
            requests = [batch.states[r].lora_request for r in scheduled.rows.tolist()]
            with blame([batch.req_ids[r] for r, lr in zip(scheduled.rows.tolist(), requests) if lr is not None],
                       "loading its LoRA adapter"):
                slots = self.lora.slots_for(requests)
            self.set_lora_mapping(slots[scheduled.req_idx])
        with blame(step_ids, "the forward pass"):
            hidden = self.forward(scheduled, scheduler_output)
        prompt_logprobs = self._prompt_logprobs(scheduled, hidden)
        sample_rows = scheduled.sample_rows
        # Chunks that sampled nothing but have prompt logprobs ride after the sampled rows,
        # so logprobs row i still belongs to req_ids[i].
        chunk_only: list[str] = []
        if prompt_logprobs:
            sampled_ids = {batch.req_ids[r] for r in sample_rows.tolist()}
            chunk_only = [r for r in prompt_logprobs if r not in sampled_ids]
        if len(sample_rows) == 0:
            return ModelRunnerOutput(req_ids=chunk_only, sampled_token_ids=[[] for _ in chunk_only],
                                     prompt_logprobs=prompt_logprobs)
        req_ids = [batch.req_ids[r] for r in sample_rows.tolist()]
        _inject("sampler", req_ids)
        with blame(req_ids, "sampling"):
            sampling = SamplingBatch.from_batch(batch, sample_rows, self.vocab_size,
                                                scheduler_output.grammar_req_ids, scheduler_output.grammar_bitmask)
            if self.proposer is None:
                tokens, logprobs = self.sample(hidden, scheduled, sampling)
            else:
                layout = SpecDecodeBatch.build(batch, scheduled, spec)
                token_lists, logprobs = self.sample_speculative(hidden, layout, sampling)
        empty: list[list[int]] = [[] for _ in chunk_only]
        if self.proposer is None:
            batch.append_tokens(sample_rows, tokens)
            return ModelRunnerOutput(req_ids=req_ids + chunk_only,
                                     sampled_token_ids=[[t] for t in tokens.tolist()] + empty,
                                     logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        batch.append_token_lists(sample_rows, token_lists)
        proposed = self._propose(sample_rows, scheduled, hidden)
        return ModelRunnerOutput(req_ids=req_ids + chunk_only, sampled_token_ids=token_lists + empty,
                                 logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                 spec_token_ids=proposed + empty if proposed else [])

    def _propose(self, rows: np.ndarray, scheduled: ScheduledTokens, hidden: Any) -> list[list[int]]:
        """The proposer's drafts for ``rows`` (none for structured outputs, whose grammar
        the drafts would bypass, nor above ``disable_by_batch_size`` running requests)."""
        batch = self.batch
        if self.spec_disable_batch_size and batch.num_reqs > self.spec_disable_batch_size:
            return []
        keep = np.fromiter((batch.states[r].sampling_params.structured_outputs is None for r in rows.tolist()),
                           dtype=bool, count=len(rows))
        k, vocab = self.proposer_k, self.vocab_size
        # At most k drafts each, cut at the first id outside the vocabulary (a custom proposer's).
        drafts = [d[:next((j for j, t in enumerate(d[:k]) if not 0 <= t < vocab), k)]
                  for d in (self.proposer.propose(batch, rows[keep], scheduled, hidden)
                            if getattr(self.proposer, "wants_scheduled", False)
                            else self.proposer.propose(batch, rows[keep]))]
        if keep.all():
            return drafts if any(drafts) else []
        out: list[list[int]] = [[] for _ in range(len(rows))]
        for i, d in zip(np.flatnonzero(keep).tolist(), drafts):
            out[i] = d
        return out if any(out) else []

    def _prompt_logprobs(self, scheduled: ScheduledTokens, hidden: Any) -> dict[str, Logprobs]:
        """Logprobs of the prompt tokens this step's chunk predicts, for requests that ask."""
        batch = self.batch
        ks = batch.num_prompt_logprobs[scheduled.rows]
        wanted = np.flatnonzero(ks >= 0)
        if len(wanted) == 0:
            return {}
        spans = []  # (req_id, k, first token index, targets)
        qsl = scheduled.query_start_loc
        for i in wanted.tolist():
            row = int(scheduled.rows[i])
            start = int(scheduled.num_computed[i])
            # Position p predicts prompt token p + 1; the last prompt position predicts output.
            stop = min(start + int(scheduled.num_scheduled[i]), int(batch.num_prompt_tokens[row]) - 1)
            if stop > start:
                spans.append((batch.req_ids[row], int(ks[i]), int(qsl[i]), batch.token_ids[row, start + 1:stop + 1]))
        if not spans:
            return {}
        token_indices = np.concatenate([np.arange(q0, q0 + len(t)) for _, _, q0, t in spans])
        targets = np.concatenate([t for *_, t in spans])
        with blame([req_id for req_id, *_ in spans], "computing prompt logprobs"):
            ids, values, ranks = self.prompt_logprobs(hidden, token_indices, targets, max(k for _, k, _, _ in spans))
        result, offset = {}, 0
        for req_id, k, _, t in spans:
            part = slice(offset, offset + len(t))
            result[req_id] = Logprobs(token_ids=ids[part, :k + 1].tolist(), logprobs=values[part, :k + 1].tolist(),
                                      ranks=ranks[part].tolist())
            offset += len(t)
        return result


def _is_fatal(e: BaseException) -> bool:
    """Out of memory is the engine's fault, whichever request was running."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e)


@contextlib.contextmanager
def blame(req_ids: list[str], what: str) -> Iterator[None]:
    """Turn an exception inside the block into a RequestFailedError naming ``req_ids``."""
    try:
        yield
    except RequestFailedError:
        raise
    except Exception as e:
        if _is_fatal(e):
            raise
        raise RequestFailedError(req_ids, f"{what} failed: {type(e).__name__}: {e}") from e


def _inject(stage: str, req_ids: list[str]) -> None:
    failing = faulty(stage, req_ids)
    if failing:
        raise RequestFailedError(failing, f"injected fault at stage {stage!r}")

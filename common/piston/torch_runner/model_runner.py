"""TorchModelRunner: the torch half of the model runner, shared by the CPU and CUDA platforms.

The step itself (the scheduler's diff, the rows to sample, prompt-logprob spans, the
output) is the step layer's ModelRunner. This class supplies what needs torch: device
inputs and attention metadata, the model call inside a forward context, logits, the
sampler, and set-up (weights, KV cache, compilation and graph capture).
"""

from __future__ import annotations

import functools
import logging
import mmap
import warnings
from typing import Any

import numpy as np
import torch

from piston.attention.backend import AttentionImpl
from piston.attention.forward_context import ForwardContext, set_forward_context
from piston.attention.layer import attention_layers
from piston.attention.metadata import CommonAttentionMetadata
from piston.compilation.capture import CaptureStrategy, dummy_decode_metadata
from piston.compilation.compiled_model import CompiledModel, capture_graphs, compile_model, resolve_mode
from piston.distributed.parallel_state import get_tp_rank, get_tp_size
from piston.step import named_tensors
from piston.step.config import EngineConfig
from piston.step.input_batch import RunnerRequestState, ScheduledTokens
from piston.step.model_runner import ModelRunner
from piston.step.runner_output import Logprobs
from piston.step.sampling_batch import SamplingBatch
from piston.step.scheduler_output import NewRequestData, SchedulerOutput
from piston.step.spec_decode import SpecDecodeBatch
from piston.torch_runner.rejection_sampler import RejectionSampler
from piston.torch_runner.sampler import Sampler, compute_logprobs, gather_logprobs
from piston.torch_runner.sampling_metadata import SamplingMetadata
from piston.torch_runner.weight_memory import WeightMemory

logger = logging.getLogger(__name__)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. A large one in host memory is an anonymous mapping in transparent huge
    pages: nothing is written at start-up, and each 2 MiB page is zeroed by the OS when first
    touched. (calloc'd 4 KiB pages cost about 18 us each to fault in on this VM, 9 s over a
    2 GiB KV cache paid inside the first requests' steps; huge pages cost 0.65 s in all, and
    torch.zeros writes every byte at start-up, 0.4 s per 2 GiB.) Without huge pages: torch.zeros."""
    if device.type != "cpu" or not _huge_pages_available():
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes < 1 << 24:
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        buf.close()
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


@functools.cache
def _huge_pages_available() -> bool:
    """Transparent huge pages on request (madvise) or always: Linux's sysfs says which."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class TorchModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, device: torch.device, attn_impl: AttentionImpl) -> None:
        super().__init__(config)
        self.device = device
        self.attn_impl = attn_impl
        mc = config.model_config
        self.dtype = getattr(torch, mc.dtype)
        self.kv_dtype = getattr(torch, config.kv_cache_dtype)  # how the KV cache stores K/V
        self.num_layers = mc.num_layers
        # This rank's KV heads: the cache holds only those (split or replicated over TP ranks).
        self.num_kv_heads = mc.heads_of_rank(get_tp_size(), get_tp_rank()).num_kv_heads
        self.head_dim = mc.head_dim
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler()
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.attn_layers: dict = {}
        # piston.compilation: the worker may set these two before load_model: the strategy
        # that runs the compiled pieces (None: run them as they are) and what compilation
        # mode "auto" means on its platform. ``compiled`` is None when the model runs eagerly.
        self.capture_strategy: CaptureStrategy | None = None
        self.default_compilation_mode = "eager"
        self.compiled: CompiledModel | None = None
        self.weight_memory: WeightMemory | None = None  # made at the first sleep
        # Speculative decoding by a draft model: the model, its attention layers, and its KV
        # cache layers, which follow the target's in ``kv_caches`` (same blocks).
        spec = config.speculative_config
        self.draft_config = spec.draft_model_config if spec is not None and spec.uses_draft_model else None
        self.draft_model: torch.nn.Module | None = None
        self.draft_attn_layers: dict = {}
        self._draft_features: torch.Tensor | None = None  # an EAGLE head's last outputs

    # ----- set-up -----------------------------------------------------------------

    def load_model(self) -> None:
        from piston.models.loader import load_model

        self.model = load_model(self.config.model_config, device=self.device)
        self.attn_layers = attention_layers(self.model)
        spec = self.config.speculative_config
        if spec is not None and spec.is_eagle3 and resolve_mode(self.config, self.default_compilation_mode) != "eager":
            # The head reads three layers' inputs, which the model keeps aside in eager runs only.
            logger.warning("An EAGLE-3 head drafts: the target runs eagerly (compilation mode %r ignored).",
                           self.config.compilation_config.mode)
            self.config.compilation_config.mode = "eager"
        if self.config.lora_config is not None:
            self._attach_lora()
        self.compiled = compile_model(self.model, self.config, self.device, self.attn_layers,
                                      self.capture_strategy, self.default_compilation_mode)
        if self.draft_config is not None:  # eager: its passes are small and few
            if spec.is_eagle3:
                from piston.models.eagle3 import load_eagle3_head

                self.draft_model = load_eagle3_head(self.draft_config, self.model, self.device)
            elif spec.is_eagle:
                from piston.models.eagle import load_eagle_head

                self.draft_model = load_eagle_head(self.draft_config, self.model, self.device)
            else:
                self.draft_model = load_model(self.draft_config, device=self.device)
            self.draft_attn_layers = attention_layers(self.draft_model)

    # ----- multi-LoRA (piston.models.layers.lora) -------------------------------------------

    def _attach_lora(self) -> None:
        from piston.models.layers.lora import attach_lora

        lc = self.config.lora_config
        if resolve_mode(self.config, self.default_compilation_mode) != "eager":
            # The LoRA layers read the step's slot mapping on the host: not traced, not captured.
            logger.warning("LoRA adapters are on: the model runs eagerly (compilation mode %r ignored).",
                           self.config.compilation_config.mode)
            self.config.compilation_config.mode = "eager"
        self.lora_layers = attach_lora(self.model, lc.max_loras, lc.max_lora_rank)
        logger.info("LoRA: %d layers with %d adapter slots of rank <= %d.", len(self.lora_layers), lc.max_loras,
                    lc.max_lora_rank)

    def write_lora_slot(self, slot: int, adapter) -> None:
        from piston.models.layers.lora import write_lora_slot

        write_lora_slot(self.lora_layers, slot, adapter)

    def set_lora_mapping(self, token_slots: np.ndarray) -> None:
        from piston.models.layers.lora import build_lora_mapping, set_lora_mapping

        set_lora_mapping(build_lora_mapping(token_slots, self.config.lora_config.max_loras, self.device))

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
        ctx = self._forward_context([self.attn_impl.build_metadata(common)] * self.kv_layout.num_groups,
                                    self.kv_caches, self.attn_layers)
        self._flush_to_device()
        with set_forward_context(ctx):
            self.compiled(ids, positions)

    def _forward_context(self, metadata: list, kv_caches: list[torch.Tensor], attn_layers: dict) -> ForwardContext:
        """The context of a forward pass given each KV cache group's metadata."""
        if len(metadata) == 1:
            return ForwardContext(metadata[0], kv_caches, self.attn_impl, attn_layers)
        return ForwardContext(metadata, kv_caches, self.attn_impl, attn_layers, self.kv_layout.layer_group)

    def kv_cache_bytes_per_block(self) -> int:
        kv_dtype = self.config.kv_cache_dtype
        target = self.config.model_config.kv_bytes_per_block(self.block_size, self.num_kv_heads,
                                                              self.kv_layout.num_cache_layers, kv_dtype)
        if self.draft_config is None:
            return target
        return target + self.draft_config.kv_bytes_per_block(self.block_size, kv_cache_dtype=kv_dtype)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        shape = self.attn_impl.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads,
                                              self.head_dim)
        # Zeros: padded reads of unused slots must be finite so masking can remove them. A
        # hybrid layout's groups share tensors: layer l uses tensor layer_cache[l].
        layout = self.kv_layout
        storage = [zeros(shape, self.kv_dtype, self.device) for _ in range(layout.num_cache_layers)]
        self.kv_caches = [storage[layout.layer_cache[layer]] for layer in range(self.num_layers)]
        if self.draft_config is not None:
            d = self.draft_config
            shape = self.attn_impl.kv_cache_shape(num_blocks, self.block_size, d.num_kv_heads, d.head_dim)
            self.kv_caches += [zeros(shape, self.kv_dtype, self.device) for _ in range(d.num_layers)]

    # ----- the KV offload tier: blocks as raw bytes -----------------------------------------

    @functools.cached_property
    def _block_axis(self) -> int:
        """The KV cache tensors' block dimension (the attention backend decides the layout)."""
        a = self.attn_impl.kv_cache_shape(2, self.block_size, self.num_kv_heads, self.head_dim)
        b = self.attn_impl.kv_cache_shape(3, self.block_size, self.num_kv_heads, self.head_dim)
        return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)

    def kv_caches_ready(self) -> bool:
        return bool(self.kv_caches)

    @torch.no_grad()
    def read_kv_blocks(self, block_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(block_ids).to(self.device)
        axis = self._block_axis
        parts = [kv.index_select(axis, ids).movedim(axis, 0).reshape(len(block_ids), -1) for kv in self.kv_caches]
        return torch.cat(parts, dim=1).view(torch.uint8).cpu().numpy()

    @torch.no_grad()
    def write_kv_blocks(self, block_ids: np.ndarray, data: np.ndarray) -> None:
        ids = torch.from_numpy(block_ids).to(self.device)
        axis, n = self._block_axis, len(block_ids)
        values = torch.from_numpy(np.ascontiguousarray(data)).to(self.device).view(self.kv_dtype).reshape(n, -1)
        offset = 0
        for kv in self.kv_caches:  # the target's layers, then a draft model's (other shapes)
            block_shape = [d for i, d in enumerate(kv.shape) if i != axis]
            size = int(np.prod(block_shape))
            layer = values[:, offset:offset + size]
            kv.index_copy_(axis, ids, layer.reshape(n, *block_shape).movedim(0, axis))
            offset += size

    # ----- sleep mode and weight updates (the Worker's interface version 6) ----------------

    def release_weights(self, keep: str | None) -> int:
        """Free the weights' memory, keeping a copy in ``keep`` ("host", "file" or None);
        returns the bytes freed."""
        if self.weight_memory is None:  # a draft model's weights sleep with the target's
            models = self.model if self.draft_model is None else torch.nn.ModuleList([self.model, self.draft_model])
            self.weight_memory = WeightMemory(models)
        return self.weight_memory.release(keep)

    def restore_weights(self) -> None:
        """Give the weights their memory back: from the kept copy, else from the checkpoint."""
        if self.weight_memory is not None and not self.weight_memory.restore():
            self.reload_weights()
            if self.lora is not None:  # the slots' memory came back empty: write them again when used
                self.lora.forget_slots()

    def reload_weights(self) -> None:
        from piston.models.loader import reload_weights

        reload_weights(self.model, self.config.model_config)
        if self.draft_model is not None:
            reload_weights(self.draft_model, self.draft_config)

    @torch.no_grad()
    def update_weights(self, weights: list) -> int:
        """Copy wire tensors (piston.step.named_tensors) into the model in place; each
        tensor-parallel rank takes its shard. Returns how many tensors were applied."""
        packed = sum(1 for m in self.model.modules() if getattr(m, "qweight", None) is not None)
        if packed:
            raise ValueError(f"update_weights replaces float weights; this model holds {packed} layers "
                             "packed (quantized). Serve a float checkpoint to update its weights.")
        if self.weight_memory is not None and self.weight_memory.released:
            raise ValueError("the weights are asleep; wake_up(tags=['weights']) before updating them.")
        tensors = []
        with warnings.catch_warnings():  # the message's bytes are read-only; they are only read
            warnings.simplefilter("ignore", UserWarning)
            for wire in weights:
                name, dtype, shape, data = named_tensors.check(wire)
                dt = getattr(torch, dtype)
                t = torch.frombuffer(data, dtype=dt) if data else torch.empty(0, dtype=dt)
                tensors.append((name, t.reshape(shape)))
        expected = self._checkpoint_shapes()
        for name, t in tensors:  # checked before anything is copied
            if name in expected and tuple(t.shape) != expected[name]:
                raise ValueError(f"weight {name} has shape {tuple(t.shape)}, but the model's checkpoint has "
                                 f"{expected[name]}.")
        return self.model.load_weights(tensors, partial=True)

    @functools.cache  # noqa: B019 - one runner per worker process, alive as long as it
    def _checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor's full shape, from the safetensors headers ({} for dummy
        weights): a weight update's shapes are checked against them before any copy."""
        from piston.checkpoint.checkpoint_reader import CheckpointReader
        from piston.models.weight_loader import iterate_safetensors, shape_of

        mc = self.config.model_config
        if mc.load_format == "dummy":
            return {}
        reader = CheckpointReader(mc.path or mc.model, mc.hf_config, packed=False)
        if reader.folder is None:
            return {}
        return {name: shape_of(t) for name, t in iterate_safetensors(reader.folder, lazy=True)}

    # ----- host-to-device copies (an accelerator runner overrides these) ----------------

    def _to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """The host arrays as tensors on the device, in order. The base copies each one now
        (nothing at all on the CPU); a runner may instead stage them and copy them together
        at the next ``_flush_to_device``, so the tensors must not be read before it."""
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]

    def _flush_to_device(self) -> None:
        """Issue the copies ``_to_device`` deferred (none in the base runner)."""

    # ----- the platform's part of a step --------------------------------------------------

    def on_new_request(self, state: RunnerRequestState, new: NewRequestData) -> None:
        params = new.sampling_params
        # With speculative decoding a seeded request gets a generator per step (_step_generators).
        if params.seed is not None and not params.greedy and self.proposer is None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed % 2**64)
            # A resumed request replays its draws so seeded output survives preemption.
            for _ in new.output_token_ids:
                torch.empty(self.vocab_size, device=self.device).exponential_(generator=gen)
            state.generator = gen

    @torch.inference_mode()
    def forward(self, scheduled: ScheduledTokens, scheduler_output: SchedulerOutput) -> torch.Tensor:
        ids, positions, ctx = self._step_inputs(scheduled, self.kv_caches[:self.num_layers], self.attn_layers,
                                                scheduler_output.num_common_prefix_blocks)
        self._flush_to_device()
        model = self.model if self.compiled is None else self.compiled  # pads to a capture size itself
        with set_forward_context(ctx):
            return model(ids, positions)

    @torch.inference_mode()
    def draft_forward(self, scheduled: ScheduledTokens, hidden: torch.Tensor | None = None,
                      hidden_index: np.ndarray | None = None) -> np.ndarray:
        eagle = hidden_index is not None  # an EAGLE head reads the next token and a feature
        ids, positions, ctx = self._step_inputs(scheduled, self.kv_caches[self.num_layers:],
                                                self.draft_attn_layers, 0, token_shift=int(eagle))
        index, *features = self._to_device(scheduled.logits_indices.astype(np.int64),
                                           *([hidden_index.astype(np.int64)] if eagle else []))
        self._flush_to_device()
        with set_forward_context(ctx):
            if eagle:
                source = self._draft_features
                if hidden is not None:  # the first pass: the target's features of the step
                    source = self.model.model.aux_hidden_states if self.model.model.aux_layers else hidden
                out = self.draft_model(ids, positions, source[features[0]])[index]
                self._draft_features = out
            else:
                out = self.draft_model(ids, positions)[index]
        greedy = None if eagle else getattr(self.draft_model, "greedy_tokens", None)
        tokens = None if greedy is None else greedy(out)  # drafts are greedy: only the argmax is read
        if tokens is None:
            tokens = self.sampler.argmax(self.draft_model.compute_logits(out))
        return tokens.cpu().numpy()

    def _step_inputs(self, scheduled: ScheduledTokens, kv_caches: list[torch.Tensor], attn_layers: dict,
                     num_common_prefix_blocks: int, token_shift: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """Token ids (those ``token_shift`` positions later: an EAGLE head's), positions and
        the forward context of ``scheduled`` (staged: flush before use) for the model whose
        attention layers and KV cache layers are given."""
        batch, positions = self.batch, scheduled.positions
        input_ids = batch.token_ids[scheduled.token_rows, positions + token_shift]
        slot_mapping = scheduled.block_numbers.astype(np.int64) * self.block_size + positions % self.block_size
        query_start_loc = scheduled.query_start_loc
        seq_lens = (scheduled.num_computed + scheduled.num_scheduled).astype(np.int32)
        rows = scheduled.rows
        max_blocks = int(batch.num_blocks[rows].max())
        qsl_t, seq_lens_t, input_ids_t, positions_t = self._to_device(query_start_loc, seq_lens, input_ids, positions)
        metadata = []
        for group in range(len(slot_mapping)):  # one block table per KV cache group
            block_table_t, slot_mapping_t = self._to_device(batch.block_table[group, rows, :max_blocks],
                                                            slot_mapping[group])
            common = CommonAttentionMetadata(
                num_reqs=len(rows), num_actual_tokens=scheduled.num_tokens,
                max_query_len=int(scheduled.num_scheduled.max()), max_seq_len=int(seq_lens.max()),
                query_start_loc_np=query_start_loc, seq_lens_np=seq_lens, query_start_loc=qsl_t,
                seq_lens=seq_lens_t, block_table=block_table_t, slot_mapping=slot_mapping_t,
                block_size=self.block_size, num_common_prefix_blocks=num_common_prefix_blocks)
            metadata.append(self.attn_impl.build_metadata(common))
        ctx = self._forward_context(metadata, kv_caches, attn_layers)
        return input_ids_t, positions_t, ctx

    @torch.inference_mode()
    def prompt_logprobs(self, hidden: torch.Tensor, token_indices: np.ndarray, targets: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index, target = self._to_device(token_indices.astype(np.int64), targets.astype(np.int64))
        self._flush_to_device()
        logits = self.model.compute_logits(hidden[index])
        lp = gather_logprobs(compute_logprobs(logits), k, target)
        return lp.token_ids.cpu().numpy(), lp.logprobs.cpu().numpy(), lp.ranks.cpu().numpy()

    @torch.inference_mode()
    def sample(self, hidden: torch.Tensor, scheduled: ScheduledTokens, sampling: SamplingBatch
               ) -> tuple[np.ndarray, Logprobs | None]:
        (logits_index,) = self._to_device(scheduled.logits_indices.astype(np.int64))
        greedy = getattr(self.model, "greedy_tokens", None)
        if greedy is not None and sampling.plain_greedy:
            # Only the argmax is read: a platform's head may find it without the logits.
            self._flush_to_device()
            tokens = greedy(hidden[logits_index])
            if tokens is not None:
                return tokens.cpu().numpy(), None
        metadata = self._sampling_metadata(sampling)
        self._flush_to_device()
        logits = self.model.compute_logits(hidden[logits_index])
        out = self.sampler(logits, metadata)
        logprobs = out.logprobs.tolists() if out.logprobs is not None else None
        return out.sampled_token_ids.cpu().numpy(), logprobs

    @torch.inference_mode()
    def sample_speculative(self, hidden: torch.Tensor, spec: SpecDecodeBatch, sampling: SamplingBatch
                           ) -> tuple[list[list[int]], Logprobs | None]:
        (index,) = self._to_device(spec.logits_indices.astype(np.int64))
        metadata = self._sampling_metadata(sampling.expand(spec.position_request, spec.position_offset, self.batch))
        generators = self._step_generators(sampling)
        self._flush_to_device()
        logits = self.model.compute_logits(hidden[index])
        tokens, logprobs = self.rejection_sampler(logits, metadata, spec, generators)
        return tokens, logprobs.tolists() if logprobs is not None else None

    def _step_generators(self, s: SamplingBatch) -> dict[int, torch.Generator]:
        """Speculative decoding: a generator per seeded sampled request, seeded from its seed
        and output length, so its draws do not depend on how many earlier steps drew."""
        gens = {}
        for i in np.flatnonzero(s.seeded & (s.temperature > 0)).tolist():
            seed = (int(s.seeds[i]) * 0x9E3779B97F4A7C15 + int(s.num_output_tokens[i])) % 2**64
            gens[i] = torch.Generator(device=self.device).manual_seed(seed)
        return gens

    def _sampling_metadata(self, s: SamplingBatch) -> SamplingMetadata:
        def t(a: np.ndarray) -> torch.Tensor:
            return self._to_device(a)[0]

        batch, rows = self.batch, s.rows
        no_penalties = s.no_penalties
        prompt_ids = output_ids = None
        if not no_penalties:
            prompt_ids = t(batch.padded_token_ids(rows, outputs=False, pad=self.vocab_size))
            extra = s.num_draft_outputs if s.num_draft_outputs is not None else np.zeros(len(rows), np.int64)
            output_ids = [batch.token_ids[r, batch.num_prompt_tokens[r]:batch.num_tokens[r] + x].tolist()
                          for r, x in zip(rows.tolist(), extra.tolist())]
        generators: dict[int, Any] = {}
        for i in np.flatnonzero(s.seeded).tolist():
            gen = batch.states[int(rows[i])].generator
            if gen is not None:
                generators[i] = gen
        return SamplingMetadata(
            temperature=t(s.temperature), all_greedy=s.all_greedy, all_random=s.all_random,
            top_p=t(s.top_p) if s.uses_top_p else None,
            top_k=t(s.top_k) if bool((s.top_k < self.vocab_size).any()) else None,
            min_p=t(s.min_p) if s.uses_min_p else None,
            generators=generators, max_num_logprobs=s.max_num_logprobs, no_penalties=no_penalties,
            presence_penalties=t(s.presence_penalty), frequency_penalties=t(s.frequency_penalty),
            repetition_penalties=t(s.repetition_penalty), prompt_token_ids=prompt_ids,
            output_token_ids=output_ids or [[] for _ in range(len(rows))], min_tokens=s.min_tokens,
            **self._grammar_rows(s, t))

    @staticmethod
    def _grammar_rows(s: SamplingBatch, t) -> dict[str, Any]:
        """The constrained rows' packed masks and their row numbers (unconstrained rows,
        all bits set, are left out of the sampler's work)."""
        if s.allowed_bitmask is None:
            return {}
        rows = np.flatnonzero((s.allowed_bitmask != -1).any(axis=1))
        if not len(rows):
            return {}
        return {"allowed_bitmask": t(np.ascontiguousarray(s.allowed_bitmask[rows])),
                "bitmask_rows": t(rows.astype(np.int64))}

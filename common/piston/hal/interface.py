"""The hardware-abstraction layer: what a platform plugin provides to the core.

A plugin is a package that registers a ``Platform`` subclass under the entry-point
group ``piston.platforms``. The core only talks to these two classes; it never imports
a platform package by name. Anything a plugin needs from the core is an argument here.
A plugin logs under ``piston.<platform>`` (``piston_cpu.worker`` logs as
``piston.cpu.worker``), where Piston's log handler shows its INFO lines; a logger outside
``piston`` is left to the application, which shows only warnings by default.

Interface version history:
  1: Platform (availability, device info, config hook, worker factory, distributed
     backend) and Worker (load, size and allocate the KV cache, execute a step).
  2: tensor parallelism. ``Platform.ray_resource`` names what one rank claims in a Ray
     placement group. With ``world_size > 1`` the executor joins the torch.distributed
     group (backend ``distributed_backend()``) before ``make_worker``; the shared torch
     models then split themselves over the ranks (piston.distributed). Each rank runs the
     same steps; only rank 0's ModelRunnerOutput is used. A platform that cannot run
     several ranks sets ``supports_tensor_parallel = False`` (the engine then rejects
     ``tensor_parallel_size > 1`` with a clear error).
  3: the step layer. The interface moved from ``piston.platforms`` to ``piston.hal``.
     Model runners build on ``piston.step.model_runner.ModelRunner`` (the shared step:
     the scheduler's diff, the rows to sample, prompt-logprob spans, the output) and
     implement only ``forward``, ``prompt_logprobs`` and ``sample``. The wire types
     (SchedulerOutput, ModelRunnerOutput, Logprobs) live in ``piston.step``, and the
     model's shape facts in ``ModelConfig`` (``num_kv_heads``, ``head_dim``,
     ``heads_of_rank``, ``kv_bytes_per_block``). ``Worker.determine_num_kv_blocks``
     returns a ``KVCacheReport`` instead of an int, and a worker no longer writes what it
     measured into the config (under the mp and Ray executors that write happened in
     another process); ``wake_up`` re-allocates the block count ``initialize_cache`` got.
  4: quantized weights. ``ModelConfig.quantization`` says how the weights are held: "gguf"
     (a GGUF file's quantized tensors packed, piston.checkpoint.packed), "int8" (a float
     checkpoint's linear weights quantized per output channel at load) or "none". A
     platform serves what it asks, or rejects it in ``check_and_update_config``. The shared
     torch models do it themselves (PackedWeight, with a ``qkernel`` slot a platform may
     fill); a platform may dequantize GGUF formats it has no kernels for (the TPU does).
  5: the prefill cap. ``SchedulerConfig.max_prefill_tokens`` left None is the platform's to
     set in ``check_and_update_config`` (0: no cap), knowing ``SchedulerConfig.online``
     (True when the engine serves live clients through AsyncLLM, False for offline
     batches). A platform whose step time grows with its token count (the CPU) caps the
     prompt tokens of a step when online, so prompts that arrive together get their first
     tokens one after another rather than all at the end of one long step.
  6: sleep levels and weight updates. ``Worker.sleep(level)``: level 1 keeps a copy of the
     weights off the device (host memory; on the CPU a temporary file, so the resident
     memory falls) and drops the KV cache, level 2 drops both. ``Worker.wake_up(tags)``
     restores "weights" (from the copy after level 1, from the checkpoint after level 2)
     and "kv_cache" (zeroed, ``initialize_cache``'s block count), either or both. A worker
     keeps its compiled programs and captured graphs valid across both, or re-captures
     them. ``Worker.update_weights(weights)`` replaces weights in place from wire tensors
     (piston.step.named_tensors; Hugging Face names, full tensors: each rank takes its
     shard); ``Worker.reload_weights()`` reads the checkpoint again. The engine preempts
     running requests and resets the prefix cache around a KV drop, and resets the prefix
     cache after a weight change.
     The KV offload tier: a platform with ``supports_kv_offload`` has its runner implement
     ``read_kv_blocks`` / ``write_kv_blocks`` (device blocks as raw bytes) and its worker
     ``clear_kv_offload``; the step layer's ModelRunner carries out each step's
     ``SchedulerOutput.kv_transfer`` with them before the forward pass.
  7: speculative decoding. A platform with ``supports_speculative`` has its model runner
     implement ``sample_speculative`` (a rejection sampler over the positions of a
     ``piston.step.spec_decode.SpecDecodeBatch``); the step layer writes the drafts, lays
     out the positions and runs the proposer. ``check_and_update_config`` may fill in
     ``SpeculativeConfig.disable_by_batch_size`` (left None: speculation is never skipped).
     Without the flag the engine rejects ``speculative_config`` with a clear error.
  8: draft models and EAGLE heads. ``Platform.draft_methods`` names the speculative
     methods with a drafting model its runner implements ("draft_model", "eagle",
     "eagle3"): it loads ``SpeculativeConfig.draft_model_config`` next to the target,
     counts the draft's KV layers in ``kv_cache_bytes_per_block`` (they live in the
     target's blocks) and implements ``draft_forward`` (piston.step.draft_proposer decides
     its passes); for an EAGLE head ``draft_forward`` gets the target's hidden states of
     the step (or, after the first pass, the head's own last outputs). The engine refuses
     a method the platform does not name.
  9: multi-LoRA. A platform with ``supports_lora`` has its model runner implement
     ``write_lora_slot(slot, adapter)`` (copy a piston.step.lora_adapter.LoRAAdapter,
     this rank's shards, into device slot ``slot`` of every LoRA layer; None zeroes it) and
     ``set_lora_mapping(token_slots)`` (each token's slot in the next forward, -1: none),
     and adds each token's adapter delta in q/k/v/o and gate/up/down. The step layer's
     piston.step.lora_slots decides the slots; the scheduler keeps a step within
     ``LoRAConfig.max_loras`` adapters. Without the flag the engine refuses ``enable_lora``.
  10: sliding windows and mixture of experts. Attention takes a per-layer window
     (piston.step.layer_types; the query at p reads keys p - W + 1 .. p). When every layer
     slides, the KV cache manager frees and hands out again the blocks wholly before a
     request's window, and a prefix hit may put block 0 in their places, without telling
     the workers: a backend must never let a block wholly before a query's window affect
     its result (skip it, or mask it so that whatever it holds counts exactly 0). MoE
     models (piston.models.layers.fused_moe) take a platform's grouped-GEMM kernel through
     ``FusedMoE.kernel``; without one the core's torch path runs.
  11: the hybrid KV cache (piston.step.kv_cache_layout). A model mixing full and
     sliding-window layers has several KV cache groups of equal size, each with its own
     block table: ``NewRequestData.block_ids`` and ``RunningRequestData.new_block_ids``
     carry one list per group (one list for every other model), ``InputBatch.block_table``
     is [groups, rows, blocks] and ``ScheduledTokens.block_numbers`` [groups, tokens]. A
     runner allocates ``kv_layout.num_cache_layers`` cache tensors (layer l writes and reads
     tensor ``layer_cache[l]`` through group ``layer_group[l]``'s table) and counts that many
     layers in ``kv_cache_bytes_per_block``. The torch runner does it for every torch
     platform (ForwardContext.layer_group).
  12: the KV cache dtype. ``CacheConfig.kv_cache_dtype`` ("auto": the model's dtype;
     ``EngineConfig.kv_cache_dtype`` resolves it) may name a dtype other than the model's;
     ``Platform.kv_cache_dtypes`` lists those a platform stores, and the engine refuses the
     rest. Its runner allocates the cache in that dtype, counts its bytes in
     ``kv_cache_bytes_per_block``, converts the step's K/V when it writes them and reads
     them back into the model's dtype (attention itself computes as before). The torch
     runner allocates and counts for every torch platform; its attention backend converts.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from piston.step.worker_messages import KVCacheReport

if TYPE_CHECKING:
    from piston.step.config import EngineConfig
    from piston.step.runner_output import ModelRunnerOutput
    from piston.step.scheduler_output import SchedulerOutput

PLATFORM_INTERFACE_VERSION = 12


class Platform(abc.ABC):
    """One kind of hardware. Subclasses are stateless apart from cached device info."""

    #: Short name used by ``PISTON_PLATFORM`` and ``--platform``.
    name: str = ""
    #: The interface version the plugin was written against.
    interface_version: int = PLATFORM_INTERFACE_VERSION
    #: Whether several ranks can run the shared torch models over ``distributed_backend()``.
    supports_tensor_parallel: bool = True
    #: Whether its model runner moves KV blocks to and from the offload tier
    #: (``ModelRunner.read_kv_blocks`` / ``write_kv_blocks``; see the version 6 note).
    supports_kv_offload: bool = False
    #: Whether its model runner implements ``sample_speculative`` (see the version 7 note).
    supports_speculative: bool = False
    #: The drafting-model methods of speculative decoding its runner implements (version 8).
    draft_methods: tuple[str, ...] = ()
    #: Whether it serves LoRA adapters (``--enable-lora``; see the version 9 note).
    supports_lora: bool = False
    #: The ``kv_cache_dtype`` values besides "auto" it stores (see the version 12 note).
    kv_cache_dtypes: tuple[str, ...] = ()

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """True when this machine can run the platform (never raises)."""

    @classmethod
    def unavailable_reason(cls) -> str:
        """One line telling a user why ``is_available()`` is False."""
        return "not available on this machine"

    @classmethod
    @abc.abstractmethod
    def device_name(cls) -> str:
        """A human-readable name of the device, for logs and benchmark records."""

    @classmethod
    @abc.abstractmethod
    def total_memory(cls) -> int:
        """Bytes of device memory (host RAM on CPU)."""

    @classmethod
    def check_and_update_config(cls, config: "EngineConfig") -> None:
        """Adjust or reject settings the platform cannot run (raise ValueError)."""

    @classmethod
    def distributed_backend(cls) -> str:
        """The torch.distributed backend name (or another collective system)."""
        return "gloo"

    @classmethod
    def ray_resource(cls) -> str:
        """The Ray resource one rank reserves in a placement group ("CPU", "GPU", "TPU")."""
        return "CPU"

    @classmethod
    @abc.abstractmethod
    def make_worker(cls, config: "EngineConfig", rank: int = 0, world_size: int = 1) -> "Worker":
        """Create the worker that runs the model for one rank."""


class Worker(abc.ABC):
    """Runs the model on one device. The engine calls the methods in this order:

    ``load_model`` -> ``determine_num_kv_blocks`` -> ``initialize_cache`` -> ``warm_up``
    -> ``execute_model`` once per step. Any other public method can be reached through
    ``collective_rpc``.
    """

    def __init__(self, config: "EngineConfig", rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size

    @abc.abstractmethod
    def load_model(self) -> None:
        """Build the model and load its weights."""

    @abc.abstractmethod
    def determine_num_kv_blocks(self) -> KVCacheReport:
        """How many KV-cache blocks fit in the memory this worker may use, and their size.
        Measure only: the engine takes the minimum over ranks and decides."""

    @staticmethod
    def kv_blocks_in(budget: int, bytes_per_block: int, block_size: int) -> KVCacheReport:
        """How many KV blocks of ``bytes_per_block`` fit in ``budget`` bytes (a helper for
        ``determine_num_kv_blocks``); ValueError naming the sizes when not even one does."""
        num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no KV block; one block of "
                f"{block_size} tokens needs {bytes_per_block} bytes for this model.")
        return KVCacheReport(int(num_blocks), int(bytes_per_block))

    @abc.abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV cache with ``num_blocks`` blocks (the same on every rank).
        A worker remembers the count: ``wake_up`` allocates it again."""

    def warm_up(self) -> None:
        """Compile or capture graphs before the first request (optional)."""

    @abc.abstractmethod
    def execute_model(self, scheduler_output: "SchedulerOutput") -> "ModelRunnerOutput":
        """Apply the step's diff, run the model and sample."""

    def sleep(self, level: int = 1) -> None:
        """Release device memory: level 1 the KV cache, keeping a copy of the weights off the
        device; level 2 the KV cache and the weights (see the version 6 note)."""
        raise NotImplementedError(f"the {type(self).__name__} worker has no sleep mode.")

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what ``sleep`` released: ``tags`` names "weights" and/or "kv_cache"
        (None: both). Restoring something not released is a no-op."""
        raise NotImplementedError(f"the {type(self).__name__} worker has no sleep mode.")

    def update_weights(self, weights: list) -> int:
        """Copy wire tensors (``[name, dtype, shape, bytes]``, Hugging Face names) into the
        model's weights in place; returns how many were applied. ValueError for a name the
        model lacks or a shape that does not match, before anything is changed where the
        platform can check first."""
        raise NotImplementedError(f"the {type(self).__name__} worker cannot update weights in place.")

    def reload_weights(self) -> None:
        """Read every weight from the checkpoint again, in place."""
        raise NotImplementedError(f"the {type(self).__name__} worker cannot reload weights.")

    # Multi-LoRA (interface version 9): the workers of a platform with ``supports_lora`` hold a
    # ``runner`` (a piston.step.model_runner.ModelRunner) that implements ``write_lora_slot``
    # and ``set_lora_mapping``; these three reach its adapter cache.
    def add_lora(self, lora_request: Any) -> bool:
        """Read a LoRA adapter (a LoRARequest, or its wire form) into host memory."""
        return self.runner.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int, in_use: bool = True) -> bool:
        """Forget an adapter; with ``in_use`` (unfinished requests use it) once they are gone."""
        return self.runner.remove_lora(lora_int_id, in_use)

    def list_loras(self) -> list[int]:
        return self.runner.list_loras()

    def shutdown(self) -> None:
        """Free resources (optional)."""

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Dispatch target of ``collective_rpc``."""
        return getattr(self, method)(*args, **kwargs)

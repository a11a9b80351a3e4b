"""EngineCore: the busy loop's body: schedule, execute, update."""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any, Iterable

import msgspec

from piston.core.request import Request, RequestStatus
from piston.core.scheduler import Scheduler
from piston.engine.structured_outputs import StructuredOutputs
from piston.executor import executor_class
from piston.executor.abstract import Executor
from piston.hal.registry import get_platform
from piston.step.config import EngineConfig
from piston.step.kv_cache_layout import blocks_per_sequence, hybrid_blocker, kv_cache_layout
from piston.step.proposer import proposer_class
from piston.step.kv_transfer import store_class, tier_directory
from piston.step.engine_messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from piston.step.runner_output import RequestFailedError

logger = logging.getLogger(__name__)

# A step may take this long, plus a share per scheduled token, before the engine counts as
# wedged (see Heartbeat): 60 s + 50 ms per token is 160 s for a 2048-token step, over ten
# times what a 2-core CPU needs. PISTON_STEP_TIMEOUT_S replaces the 60 s.
STEP_TIMEOUT_S = float(os.environ.get("PISTON_STEP_TIMEOUT_S", 60.0))
STEP_TIMEOUT_PER_TOKEN_S = 0.05

WAKE_UP_TAGS = frozenset({"weights", "kv_cache"})


def load_scheduler_cls(policy: str) -> type[Scheduler]:
    """The built-in Scheduler, or a user's class named ``module:Class`` / ``module.Class``."""
    if ":" not in policy and "." not in policy:
        return Scheduler
    module, _, name = policy.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scheduling policy {policy!r}: cannot import the scheduler class ({e}).") from e
    return cls


class EngineCore:
    """Owns the scheduler and the executor. Not thread-safe: one caller drives it."""

    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        platform = get_platform(config.platform or None)
        config.platform = platform.name
        platform.check_and_update_config(config)
        if config.speculative_config is not None and not platform.supports_speculative:
            raise ValueError(f"speculative_config: the {platform.name} platform has no speculative decoding yet.")
        spec = config.speculative_config
        if spec is not None and spec.uses_draft_model and spec.method not in platform.draft_methods:
            raise ValueError(f"speculative_config: the {platform.name} platform cannot run method {spec.method!r} "
                             f"yet (it runs {', '.join(platform.draft_methods) or 'no drafting models'}).")
        if config.speculative_config is not None and ":" in config.speculative_config.method:
            proposer_class(config.speculative_config.method)  # a bad name fails here, before any worker
        if config.lora_config is not None and not platform.supports_lora:
            raise ValueError(f"enable_lora: the {platform.name} platform cannot serve LoRA adapters yet.")
        kv_dtype = config.cache_config.kv_cache_dtype
        if kv_dtype != "auto" and kv_dtype not in platform.kv_cache_dtypes:
            raise ValueError(f"kv_cache_dtype={kv_dtype!r}: the {platform.name} platform stores K/V as "
                             f"{', '.join(platform.kv_cache_dtypes) or 'the model dtype only'} (or auto).")
        tp = config.parallel_config.tensor_parallel_size
        if tp > 1 and not platform.supports_tensor_parallel:
            raise ValueError(f"tensor_parallel_size={tp}: the {platform.name} platform runs one rank "
                             "only; use tensor_parallel_size=1.")
        self.config = config
        self.kv_cache_memory = 0  # bytes per rank, once the workers have reported
        # Error outputs of requests that failed outside a step, sent with the next step's.
        self.failed_outputs: list[EngineCoreOutput] = []
        self.structured = StructuredOutputs(config)
        # What the engine is doing, for the heartbeat (read from another thread): when the
        # current step or call began (0.0 when idle), and how long it may take.
        self.busy_since = 0.0
        self.busy_deadline_s = 0.0
        self.num_steps = 0
        self.stats: SchedulerStats | None = None  # as of the last step or handled message
        # What sleep released and wake_up has not restored ("weights", "kv_cache"): while
        # anything is, no step is scheduled and requests wait.
        self.asleep: set[str] = set()
        self.sleep_level = 0
        self.executor: Executor = executor_class(config)(config, platform)
        try:
            self._init_cache(config)
            self.scheduler = load_scheduler_cls(config.scheduler_config.policy)(config)
        except BaseException:
            self.executor.shutdown()
            raise
        cc = config.cache_config
        logger.info(
            "EngineCore ready on %s in %.1f s: KV cache %d blocks x %d tokens = %d tokens "
            "(%.2f GiB, %s), max_num_seqs=%d, max_num_batched_tokens=%d (prompt tokens per step: %s), "
            "prefix caching %s, tensor parallel %d (%s executor)%s",
            platform.name, time.perf_counter() - start, cc.num_blocks, cc.block_size,
            cc.num_blocks * cc.block_size, self.kv_cache_memory / 2**30, config.kv_cache_dtype,
            config.scheduler_config.max_num_seqs, config.scheduler_config.max_num_batched_tokens,
            self.scheduler.max_prefill_tokens or "no cap",
            "on" if cc.enable_prefix_caching else "off", config.parallel_config.tensor_parallel_size,
            config.parallel_config.executor_backend, _describe_speculation(config))

    def _init_cache(self, config: EngineConfig) -> None:
        """Size the KV cache from the workers' reports (the smallest rank decides) and
        allocate it on every rank."""
        cc = config.cache_config
        reports = self.executor.determine_num_kv_blocks()
        num_blocks = min(r.num_blocks for r in reports)
        self.kv_cache_memory = num_blocks * reports[0].bytes_per_block
        layout = kv_cache_layout(config)
        sliding = [g.sliding_window for g in layout.groups if g.sliding_window is not None]
        blocks_per_seq = blocks_per_sequence(layout, config.model_config.max_model_len, cc.block_size,
                                             config.scheduler_config.max_num_batched_tokens)
        if num_blocks < blocks_per_seq:
            held = "" if not sliding else (
                f" (with sliding windows of {max(sliding)} tokens, one sequence holds at most {blocks_per_seq} "
                f"blocks over {layout.num_groups} block table(s): the windows and a step of max_num_batched_tokens="
                f"{config.scheduler_config.max_num_batched_tokens})")
            raise ValueError(
                f"The KV cache ({num_blocks} blocks of {cc.block_size} tokens, "
                f"{self.kv_cache_memory} bytes per rank) cannot hold one sequence of "
                f"max_model_len={config.model_config.max_model_len} tokens{held}; raise kv_cache_memory "
                f"or lower max_model_len" + ("" if sliding else f" to at most {num_blocks * cc.block_size}") + ".")
        if layout.hybrid:
            logger.info("Hybrid KV cache: %d block tables over groups of %d layers (%s); the sliding groups free "
                        "their blocks behind the window (a sequence holds at most %d blocks).", layout.num_groups,
                        layout.num_cache_layers, ", ".join(
                            "full" if g.sliding_window is None else f"window {g.sliding_window}"
                            for g in layout.groups), blocks_per_seq)
        elif sliding:
            logger.info("Every layer slides over %d tokens: each request's KV blocks behind its window are freed "
                        "(a sequence holds at most %d blocks).", sliding[0], blocks_per_seq)
        else:
            blocker = hybrid_blocker(config)
            if blocker is not None:
                logger.info("The model mixes full and sliding-window layers, but every layer keeps every KV "
                            "block: %s.", blocker)
        cc.num_blocks = num_blocks  # the engine's own decision, in the engine's own config
        if cc.kv_offloading:
            self._size_kv_offload(config, sum(r.bytes_per_block for r in reports))
        self.executor.initialize_cache(num_blocks)

    def _size_kv_offload(self, config: EngineConfig, bytes_per_block: int) -> None:
        cc = config.cache_config
        if not get_platform(config.platform).supports_kv_offload:
            raise ValueError(f"--kv-offloading-size/--kv-offloading-dir: the {config.platform} platform has no "
                             "KV offload tier yet.")
        store_class(cc.kv_offloading_backend)  # a bad name fails here, clearly, before any worker uses it
        cc.kv_offload_host_blocks = cc.kv_offloading_size // bytes_per_block
        cc.kv_offload_disk_blocks = cc.kv_offloading_disk_size // bytes_per_block if cc.kv_offloading_dir else 0
        if cc.kv_offloading_size and not cc.kv_offload_host_blocks:
            raise ValueError(f"kv_offloading_size={cc.kv_offloading_size} bytes holds no KV block "
                             f"({bytes_per_block} bytes for this model).")
        logger.info("KV offload tier: %d blocks in host memory (%.2f GiB)%s.", cc.kv_offload_host_blocks,
                    cc.kv_offload_host_blocks * bytes_per_block / 2**30,
                    f", {cc.kv_offload_disk_blocks} on disk under {tier_directory(config)}"
                    if cc.kv_offload_disk_blocks else "")

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request. One the scheduler cannot take fails alone: its error output goes
        out with the next step's outputs."""
        try:
            core_request = Request.from_engine_core_request(request)
            if not self.structured.add(core_request):
                self.scheduler.add_request(core_request)
        except Exception as e:
            logger.exception("Request %s could not be added", request.request_id)
            self.failed_outputs.append(EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[], finish_reason="error",
                error=f"the engine could not accept the request: {type(e).__name__}: {e}"))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        self.structured.abort(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.failed_outputs) or bool(self.structured.waiting)

    def can_step(self) -> bool:
        """Whether a step now would do anything: asleep, requests wait for the wake-up."""
        return bool(self.failed_outputs) or (not self.asleep and self.has_unfinished_requests())

    def step(self) -> EngineCoreOutputs:
        """Run one scheduling step; returns what each request produced, and the stats.

        A step that fails because of some requests (RequestFailedError) fails those alone
        and recomputes the others; any other exception means the engine cannot go on.
        """
        outputs, self.failed_outputs = self.failed_outputs, []
        if self.structured.waiting:
            outputs += self.structured.admit_ready(self.scheduler)
        if self.scheduler.has_unfinished_requests() and not self.asleep:
            self.busy_deadline_s, self.busy_since = STEP_TIMEOUT_S, time.monotonic()
            try:
                scheduler_output = self.scheduler.schedule()
                self.busy_deadline_s += STEP_TIMEOUT_PER_TOKEN_S * scheduler_output.total_num_scheduled_tokens
                self.structured.attach_bitmask(scheduler_output, self.scheduler)
                try:
                    runner_output = self.executor.execute_model(scheduler_output)
                except RequestFailedError as e:
                    outputs += self.scheduler.fail_step(scheduler_output, e.req_ids, e.message)
                else:
                    step_outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
                    self.structured.advance(step_outputs, self.scheduler)
                    outputs += step_outputs
            finally:
                self.busy_since = 0.0
                self.num_steps += 1
        self.stats = self.scheduler.make_stats()
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.stats)

    # ----- utility calls (reachable from the front end by name) ---------------------

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    def get_num_free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def get_num_total_blocks(self) -> int:
        return self.config.cache_config.num_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, the offload tier's included."""
        self.scheduler.kv_cache_manager.reset_prefix_cache()
        if self.config.cache_config.kv_offloading:
            self.executor.collective_rpc("clear_kv_offload")
        return True

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        return self.executor.collective_rpc(method, args, kwargs)

    # ----- LoRA adapters -------------------------------------------------------------------

    def add_lora(self, lora_request: Any) -> bool:
        """Read an adapter into every worker's host memory (its first request then skips the
        disk); ValueError naming what is wrong with it."""
        self._check_lora()
        return all(self.executor.collective_rpc("add_lora", (lora_request,)))

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter's weights; requests already running with it finish with it. Its
        blocks in the prefix cache are never matched again (new loads get new ids)."""
        self._check_lora()
        # The engine knows which requests are unfinished; a worker's batch still holds the
        # requests that finished in the last step until the next one.
        in_use = any(r.lora_request is not None and r.lora_request.lora_int_id == lora_int_id
                     for r in self.scheduler.requests.values())
        return any(self.executor.collective_rpc("remove_lora", (lora_int_id, in_use)))

    def list_loras(self) -> list[int]:
        """The adapter ids the workers hold (rank 0's host memory and slots)."""
        self._check_lora()
        return self.executor.collective_rpc("list_loras")[0]

    def _check_lora(self) -> None:
        if self.config.lora_config is None:
            raise ValueError("LoRA adapters are off: start the engine with enable_lora=True (--enable-lora).")

    # ----- sleep mode and weight updates -------------------------------------------------

    def sleep(self, level: int = 1) -> int:
        """Give the device memory back: level 1 drops the KV cache and keeps the weights off
        the device, level 2 drops both (wake_up reloads them from the checkpoint). Running
        requests go back to the waiting queue and are computed again after the wake-up;
        the prefix cache is emptied. Returns how many requests were sent back."""
        if level not in (1, 2):
            raise ValueError(f"sleep level {level!r}: use 1 (weights kept off the device) or 2 (weights dropped).")
        if self.asleep:
            raise ValueError(f"the engine is already asleep (level {self.sleep_level}); wake_up first.")
        start = time.perf_counter()
        preempted = self.scheduler.preempt_all()
        self.scheduler.kv_cache_manager.reset_prefix_cache(keep_offloaded=True)
        self.executor.collective_rpc("sleep", (level,))
        self.asleep, self.sleep_level = {"weights", "kv_cache"}, level
        logger.info("Asleep at level %d in %.2f s; %d running requests will be computed again after the "
                    "wake-up.", level, time.perf_counter() - start, preempted)
        return preempted

    def wake_up(self, tags: list[str] | None = None) -> list[str]:
        """Restore what sleep released: ``tags`` names "weights" and/or "kv_cache" (None:
        both). Returns what is still asleep."""
        tags = sorted(WAKE_UP_TAGS) if tags is None else list(tags)
        unknown = [t for t in tags if t not in WAKE_UP_TAGS]
        if unknown or not tags:
            raise ValueError(f"wake_up tags {tags!r}: use any of {sorted(WAKE_UP_TAGS)}.")
        start = time.perf_counter()
        todo = [t for t in tags if t in self.asleep]
        if todo:
            self.executor.collective_rpc("wake_up", (todo,))
            self.asleep -= set(todo)
            logger.info("Woke up %s in %.2f s%s.", " and ".join(todo), time.perf_counter() - start,
                        f"; still asleep: {', '.join(sorted(self.asleep))}" if self.asleep else "")
        if not self.asleep:
            self.sleep_level = 0
        return sorted(self.asleep)

    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    def update_weights(self, weights: list) -> int:
        """Replace weights in place from wire tensors (piston.step.named_tensors: Hugging
        Face names, full tensors; every rank takes its shard). The prefix cache is emptied:
        its KV came from the old weights. Running requests go on with the new weights.
        Returns how many tensors were applied."""
        if "weights" in self.asleep:
            raise ValueError("the weights are asleep; wake_up(tags=['weights']) before updating them.")
        if not isinstance(weights, list):
            raise TypeError("update_weights takes a list of [name, dtype, shape, bytes] wire tensors.")
        applied = self.executor.collective_rpc("update_weights", (weights,))[0]
        self.reset_prefix_cache()
        return applied

    def reload_weights(self) -> bool:
        """Read every weight from the checkpoint again (undoing updates); empties the prefix cache."""
        if "weights" in self.asleep:
            raise ValueError("the weights are asleep; wake_up(tags=['weights']) first.")
        self.executor.collective_rpc("reload_weights")
        self.reset_prefix_cache()
        return True

    def shutdown(self) -> None:
        self.structured.shutdown()
        kv = getattr(getattr(self, "scheduler", None), "kv_cache_manager", None)
        if kv is not None and kv.offload is not None and not self.asleep:
            try:  # the last step's blocks, to the disk tier: a restart finds them
                kv.persist_step()
                if (transfer := kv.offload.take_transfer()) is not None:
                    self.executor.collective_rpc("apply_kv_transfer", (msgspec.to_builtins(transfer),))
            except Exception:
                logger.exception("Could not write the last KV blocks to the offload tier")
        self.executor.shutdown()


def _describe_speculation(config: EngineConfig) -> str:
    spec = config.speculative_config
    if spec is None:
        return ""
    off = f", off above {spec.disable_by_batch_size} running requests" if spec.disable_by_batch_size else ""
    model = f" ({spec.model})" if spec.uses_draft_model else ""
    return f", speculative decoding {spec.method}{model} with {spec.num_speculative_tokens} drafts{off}"

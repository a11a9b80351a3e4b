"""CpuPlatform: runs the shared torch models on the host CPU."""

from __future__ import annotations

import logging
import os
import platform as _platform

from piston.hal.interface import Platform

logger = logging.getLogger(__name__.replace("piston_cpu", "piston.cpu", 1))

# KV cache memory when the user gives none, capped at a quarter of free RAM. Zero-filling
# it costs about 1 s per GiB here, so the default stays moderate.
DEFAULT_KV_CACHE_BYTES = 2 * 2**30
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# Prompt tokens per step when serving live clients (SchedulerConfig.max_prefill_tokens). A
# step's time here grows with its tokens at the same rate from about 128 rows on (SmolLM2:
# 1.56 ms per token in a 128-token step and in an 897-token one), so batching more prompts
# into one step buys no throughput; it only makes every prompt in it wait for the last.
# Offline batches keep no cap: there each extra step costs a pass over the packed weights
# (a 64-request batch ran 3-7% slower with a cap of 128-256).
ONLINE_MAX_PREFILL_TOKENS = 128
# Speculative decoding pays while a step is bound by reading the weights: checking k drafts
# costs little more than one token. Past this many running requests the step is bound by
# compute, and drafts rejected there are work thrown away (benchmarks/spec_decode.py).
SPECULATION_MAX_BATCH = 16
# With a draft model (or an EAGLE head) each draft costs a pass of that model, and its passes
# grow with the batch while the verify step does not: 1.22-1.33x at 1 request, 0.81x at 4.
DRAFT_MODEL_MAX_BATCH = 2


class CpuPlatform(Platform):
    name = "cpu"
    supports_kv_offload = True
    supports_speculative = True
    draft_methods = ("draft_model", "eagle", "eagle3")
    supports_lora = True
    kv_cache_dtypes = ("float32", "float16", "bfloat16")

    @classmethod
    def is_available(cls) -> bool:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def unavailable_reason(cls) -> str:
        return "torch is not installed (pip install 'piston[cpu]')"

    @classmethod
    def device_name(cls) -> str:
        model = _platform.processor() or _platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"{model} ({os.cpu_count()} cores)"

    @classmethod
    def total_memory(cls) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @classmethod
    def available_memory(cls) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    @classmethod
    def check_and_update_config(cls, config) -> None:
        dtype = config.model_config.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported on the CPU; use one of {SUPPORTED_DTYPES}.")
        if config.cache_config.kv_cache_memory is None:
            config.cache_config.kv_cache_memory = min(DEFAULT_KV_CACHE_BYTES, cls.available_memory() // 4)
        sched = config.scheduler_config
        if sched.max_prefill_tokens is None:
            sched.max_prefill_tokens = ONLINE_MAX_PREFILL_TOKENS if sched.online else 0
        spec = config.speculative_config
        if spec is not None and spec.disable_by_batch_size is None:
            spec.disable_by_batch_size = DRAFT_MODEL_MAX_BATCH if spec.uses_draft_model else SPECULATION_MAX_BATCH

    @classmethod
    def make_worker(cls, config, rank=0, world_size=1):
        from piston_cpu.worker import CpuWorker

        return CpuWorker(config, rank, world_size)

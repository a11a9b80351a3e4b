"""EngineArgs: the user-facing settings, shared by ``LLM(...)`` and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass

from piston.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                           SchedulerConfig, parse_size)

logger = logging.getLogger(__name__)


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    max_model_len: int | None = None
    seed: int = 0
    block_size: int = 16
    kv_cache_memory: int | str | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    scheduling_policy: str = "fcfs"
    scheduler_cls: str | None = None
    tensor_parallel_size: int = 1
    platform: str | None = None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = EngineArgs()
        add = parser.add_argument
        add("--model", default=None, help="Hugging Face folder, .gguf file or hub id "
            "(default: the built-in SmolLM2-135M-Instruct)")
        add("--tokenizer", default=None, help="tokenizer folder, if not the model's")
        add("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
        add("--max-model-len", type=int, default=None, help="context length (default: the model's)")
        add("--seed", type=int, default=d.seed)
        add("--block-size", type=int, default=d.block_size)
        add("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB (default: the platform's)")
        add("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
        add("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
        add("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        add("--max-num-seqs", type=int, default=d.max_num_seqs)
        add("--scheduling-policy", default=d.scheduling_policy,
            help="fcfs, priority, fair, or module:Class of a custom scheduler")
        add("--scheduler-cls", default=None,
            help="module:Class of a custom Scheduler subclass (overrides --scheduling-policy)")
        add("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
        add("--platform", default=None, help="cpu, cuda or tpu (default: $PISTON_PLATFORM or auto)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def _validate(self) -> None:
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.block_size % 8:
            raise ValueError(f"block_size must be a multiple of 8, got {self.block_size}.")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet; use 1.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}.")

    def create_engine_config(self) -> EngineConfig:
        """Resolve the model, read its config and fill in every derived setting."""
        from piston.model_executor.model_loader import load_hf_config
        from piston.model_resolver import DEFAULT_MODEL_NAME, resolve_model

        self._validate()
        path = resolve_model(self.model)
        mc = ModelConfig(model=self.model or DEFAULT_MODEL_NAME, path=path, tokenizer=self.tokenizer,
                         dtype=self.dtype, seed=self.seed)
        load_hf_config(mc)
        native = _native_context(mc.hf_config)
        if self.max_model_len is None:
            mc.max_model_len = native
        elif self.max_model_len > native:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context "
                             f"length {native}.")
        else:
            mc.max_model_len = self.max_model_len
        batched = self.max_num_batched_tokens
        if not self.enable_chunked_prefill and batched < mc.max_model_len:
            # Without chunking a whole prompt must fit in one step.
            batched = mc.max_model_len
        cache = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=None if self.kv_cache_memory is None else parse_size(self.kv_cache_memory),
            enable_prefix_caching=self.enable_prefix_caching)
        sched = SchedulerConfig(max_num_batched_tokens=batched, max_num_seqs=self.max_num_seqs,
                                enable_chunked_prefill=self.enable_chunked_prefill,
                                policy=self.scheduler_cls or self.scheduling_policy)
        return EngineConfig(mc, cache, sched, ParallelConfig(self.tensor_parallel_size),
                            platform=self.platform or "")


def _native_context(hf_config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048

"""EngineArgs: the user-facing settings, shared by ``LLM(...)`` and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass

from piston.step.config import (
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    MODEL_IMPLS,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
    parse_kv_cache_dtype,
    parse_size,
)
from piston.step.hf_config import native_context_length

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
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    kv_offloading_size: int | str = 0
    kv_offloading_dir: str | None = None
    kv_offloading_disk_size: int | str = "16GiB"
    kv_offloading_backend: str = "native"
    disable_hybrid_kv_cache_manager: bool = False
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int = 2048
    max_prefill_tokens: int | None = None
    max_num_seqs: int = 256
    scheduling_policy: str = "fcfs"
    scheduler_cls: str | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    worker_extension_cls: str | None = None
    load_format: str = "auto"
    enforce_eager: bool = False
    disable_cascade_attn: bool = False
    max_logprobs: int = 20
    structured_outputs_backend: str = "auto"
    quantization: str | None = None
    gpu_memory_utilization: float = 0.9
    compilation_mode: str = "auto"
    capture_sizes: list[int] | None = None
    compilation_cache_dir: str | None = None
    speculative_config: dict | str | None = None
    platform: str | None = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    model_impl: str = "auto"

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
        add("--kv-cache-dtype", default=d.kv_cache_dtype,
            help="how K and V are stored: auto (the model's dtype), float32, float16 (fp16) or bfloat16 "
                 "(bf16); a 16-bit cache holds twice the tokens and halves attention's memory reads, and "
                 "rounds each K/V value once when it is written (default: auto)")
        add("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
        add("--kv-offloading-size", default="0",
            help="host memory for prefix-cache blocks evicted from the KV cache, e.g. 4GiB; a later "
                 "request whose prefix is there loads it instead of recomputing it (default 0: off)")
        add("--kv-offloading-dir", default=None,
            help="a directory for blocks evicted from the host tier (or from the KV cache, without one); "
                 "the files survive restarts, keyed by model, dtype and KV layout")
        add("--kv-offloading-disk-size", default=d.kv_offloading_disk_size,
            help="the most bytes --kv-offloading-dir may hold (least recently used files go first)")
        add("--disable-hybrid-kv-cache-manager", action="store_true",
            help="a model mixing full and sliding-window layers (Gemma 3) keeps one block table for all "
                 "layers and frees nothing behind the windows (default: a block table per group of layers)")
        add("--kv-offloading-backend", default=d.kv_offloading_backend,
            help="the workers' block store: native, or module:Class of an external store with the "
                 "interface of piston.step.kv_transfer.KVTierStore")
        add("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
        add("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        add("--max-prefill-tokens", type=int, default=None,
            help="most prompt (catch-up) tokens one step computes, the rest of "
            "--max-num-batched-tokens going to decodes; smaller means prompts that arrive "
            "together get their first tokens one after another instead of all at the end "
            "(default: the platform's; 0: no cap)")
        add("--max-num-seqs", type=int, default=d.max_num_seqs)
        add("--scheduling-policy", default=d.scheduling_policy,
            help="fcfs, priority, fair, or module:Class of a custom scheduler")
        add("--scheduler-cls", default=None,
            help="module:Class of a custom Scheduler subclass (overrides --scheduling-policy)")
        add("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size)
        add("--distributed-executor-backend", default=None, choices=["uni", "mp", "ray"],
            help="how ranks run: uni (in the engine process, TP=1 only), mp (a process per "
            "rank on this host) or ray (Ray actors, may span nodes); default mp when TP > 1")
        add("--worker-extension-cls", default=None,
            help="module:Class whose methods are added to every worker (collective_rpc targets)")
        add("--load-format", default=d.load_format, choices=["auto", "dummy"],
            help="dummy: random weights in the checkpoint's shapes (needs only config.json)")
        add("--enforce-eager", action="store_true", help="no compilation and no graph capture")
        add("--disable-cascade-attn", action="store_true",
            help="never use cascade attention for a prefix shared by the whole batch (CUDA)")
        add("--structured-outputs-backend", default=d.structured_outputs_backend,
            choices=["auto", "xgrammar", "guidance"],
            help="grammar engine for structured outputs (auto: xgrammar where it imports, else llguidance)")
        add("--max-logprobs", type=int, default=d.max_logprobs,
            help="the most logprobs and prompt logprobs a request may ask for per position (-1: no cap)")
        add("--quantization", default=None, choices=["auto", "gguf", "int8", "none"],
            help="gguf: serve a .gguf file's quantized weights packed (the default for one); int8: "
            "quantize a float checkpoint's linear weights to int8 per output channel at load; none: "
            "dequantize to --dtype")
        add("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
            help="accelerators: fraction of device memory to use when --kv-cache-memory is not given")
        add("--compilation-mode", default=d.compilation_mode, choices=["auto", "eager", "piecewise"],
            help="auto: the platform's default; piecewise: compile the pieces between attention calls")
        add("--capture-sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
            help="comma-separated batch sizes (tokens) to capture graphs for")
        add("--compilation-cache-dir", default=None, help="compile cache folder (default: user cache)")
        add("--speculative-config", default=None,
            help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                 '"prompt_lookup_min": 2, "prompt_lookup_max": 5}\' (greedy output is unchanged, sampled '
                 'output keeps its distribution)')
        add("--platform", default=None, help="cpu, cuda or tpu (default: $PISTON_PLATFORM or auto)")
        add("--enable-lora", action="store_true",
            help="serve PEFT LoRA adapters: requests name one (the server's --lora-modules), and one batch "
            "mixes adapters and the base model")
        add("--max-loras", type=int, default=d.max_loras, help="the most adapters in one batch (with --enable-lora)")
        add("--max-lora-rank", type=int, default=d.max_lora_rank, help="the largest adapter rank served")
        add("--max-cpu-loras", type=int, default=None,
            help="adapters kept in host memory, least recently used evicted (default: --max-loras)")
        add("--model-impl", default=d.model_impl, choices=list(MODEL_IMPLS),
            help="piston: Piston's own model classes; transformers: transformers' modelling code with Piston's "
            "paged attention (any decoder-only causal LM; CPU and CUDA); auto: Piston's own where it has one")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def _validate(self) -> None:
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 0:
            raise ValueError(f"max_prefill_tokens must be >= 0 (0: no cap), got {self.max_prefill_tokens}.")
        if self.block_size % 8:
            raise ValueError(f"block_size must be a multiple of 8, got {self.block_size}.")
        backend = self.distributed_executor_backend
        if backend not in (None, "uni", "mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be uni, mp or ray, got {backend!r}.")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs one rank; use mp or ray "
                             f"for tensor_parallel_size={self.tensor_parallel_size}.")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.compilation_mode not in ("auto", "eager", "piecewise"):
            raise ValueError(f"compilation_mode must be auto, eager or piecewise, got {self.compilation_mode!r}.")
        if self.capture_sizes is not None and any(s < 1 for s in self.capture_sizes):
            raise ValueError(f"capture_sizes must be positive, got {self.capture_sizes}.")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be >= 0 (or -1 for no cap), got {self.max_logprobs}.")
        if self.quantization not in (None, "auto", "gguf", "int8", "none"):
            raise ValueError(f"quantization must be auto, gguf, int8 or none, got {self.quantization!r}.")
        SpeculativeConfig.from_value(self.speculative_config)  # a bad one fails before the model is read
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}.")
        parse_kv_cache_dtype(self.kv_cache_dtype)
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {self.model_impl!r}.")
        if self.enable_lora:
            self._lora_config().validate()
            if self.speculative_config is not None:
                raise ValueError("enable_lora and speculative_config cannot be used together yet: drafts would "
                                 "come from the base model, not the request's adapter.")

    def _lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    def create_engine_config(self) -> EngineConfig:
        """Resolve the model, read its config and fill in every derived setting."""
        from piston.checkpoint.checkpoint_reader import read_hf_config
        from piston.checkpoint.packed import resolve_quantization
        from piston.model_resolver import DEFAULT_MODEL_NAME, resolve_model

        self._validate()
        path = resolve_model(self.model)
        hf_config = read_hf_config(path)
        mc = ModelConfig(model=self.model or DEFAULT_MODEL_NAME, path=path, tokenizer=self.tokenizer,
                         dtype=self.dtype, seed=self.seed, load_format=self.load_format,
                         enforce_eager=self.enforce_eager, max_logprobs=self.max_logprobs, hf_config=hf_config,
                         disable_cascade_attn=self.disable_cascade_attn, model_impl=self.model_impl)
        mc.quantization = resolve_quantization(self.quantization, path)
        native = native_context_length(hf_config)
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
            kv_cache_dtype=parse_kv_cache_dtype(self.kv_cache_dtype),
            enable_prefix_caching=self.enable_prefix_caching,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_offloading_size=parse_size(self.kv_offloading_size, "kv_offloading_size"),
            kv_offloading_dir=self.kv_offloading_dir,
            kv_offloading_disk_size=parse_size(self.kv_offloading_disk_size, "kv_offloading_disk_size"),
            kv_offloading_backend=self.kv_offloading_backend,
            disable_hybrid_kv_cache_manager=self.disable_hybrid_kv_cache_manager)
        sched = SchedulerConfig(max_num_batched_tokens=batched, max_prefill_tokens=self.max_prefill_tokens,
                                max_num_seqs=self.max_num_seqs,
                                enable_chunked_prefill=self.enable_chunked_prefill,
                                policy=self.scheduler_cls or self.scheduling_policy)
        parallel = ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend,
                                  self.worker_extension_cls)
        compilation = CompilationConfig(
            mode="eager" if self.enforce_eager else self.compilation_mode,
            capture_sizes=sorted(set(self.capture_sizes)) if self.capture_sizes else None,
            cache_dir=self.compilation_cache_dir)
        spec = SpeculativeConfig.from_value(self.speculative_config)
        if self.model_impl == "transformers":
            self._check_transformers_fallback(spec, mc)
        if spec is not None and spec.uses_draft_model:
            spec.draft_model_config = self._draft_model_config(spec, mc)
        return EngineConfig(mc, cache, sched, parallel, compilation,
                            StructuredOutputsConfig(self.structured_outputs_backend),
                            speculative_config=spec, platform=self.platform or "",
                            lora_config=self._lora_config() if self.enable_lora else None)

    def _check_transformers_fallback(self, spec: SpeculativeConfig | None, mc: ModelConfig) -> None:
        """What model_impl="transformers" cannot serve, refused before any process starts
        (with "auto" the fallback model refuses the same when it loads)."""
        problems = []
        if self.tensor_parallel_size > 1:
            problems.append(f"tensor_parallel_size={self.tensor_parallel_size} (it runs on one rank)")
        if self.enable_lora:
            problems.append("LoRA adapters")
        if spec is not None and spec.is_eagle:
            problems.append(f"speculative method {spec.method} (EAGLE heads need Piston's own model)")
        if mc.quantization in ("gguf", "int8"):
            problems.append(f"quantization={mc.quantization} (float weights only: use quantization='none')")
        if problems:
            raise ValueError(f"model_impl='transformers' (the transformers fallback) cannot serve "
                             f"{'; '.join(problems)}.")

    def _draft_model_config(self, spec: SpeculativeConfig, target: ModelConfig) -> ModelConfig:
        """The draft model's ModelConfig: the target's dtype, context and seed; ValueError
        when it cannot draft for the target (another vocabulary, a shorter context, TP)."""
        from piston.checkpoint.checkpoint_reader import read_hf_config
        from piston.checkpoint.packed import resolve_quantization
        from piston.model_resolver import resolve_model

        if self.tensor_parallel_size > 1:
            raise ValueError(f"speculative_config: method {spec.method} runs with tensor_parallel_size=1 only, "
                             f"got {self.tensor_parallel_size}.")
        try:
            path = resolve_model(spec.model)
            hf_config = read_hf_config(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"speculative_config.model={spec.model!r}: {e}") from e
        draft = ModelConfig(model=spec.model, path=path, dtype=target.dtype, seed=target.seed,
                            load_format=self.load_format, enforce_eager=True, hf_config=hf_config,
                            max_model_len=target.max_model_len)
        draft.quantization = resolve_quantization(spec.quantization or "auto", path)
        if spec.is_eagle3:
            target_hidden = getattr(hf_config, "target_hidden_size", None) or draft.hidden_size
            if (target_hidden, draft.vocab_size) != (target.hidden_size, target.vocab_size):
                raise ValueError(f"speculative_config.model={spec.model!r}: an EAGLE-3 head for hidden size "
                                 f"{target_hidden} and vocabulary {draft.vocab_size} cannot draft for this target "
                                 f"(hidden size {target.hidden_size}, vocabulary {target.vocab_size}).")
        elif spec.is_eagle:
            if (draft.hidden_size, draft.vocab_size) != (target.hidden_size, target.vocab_size):
                raise ValueError(f"speculative_config.model={spec.model!r}: an EAGLE head of hidden size "
                                 f"{draft.hidden_size} and vocabulary {draft.vocab_size} cannot draft for this "
                                 f"target (hidden size {target.hidden_size}, vocabulary {target.vocab_size}).")
        elif draft.vocab_size > target.vocab_size:
            raise ValueError(f"speculative_config.model={spec.model!r}: its vocabulary ({draft.vocab_size} tokens) "
                             f"is larger than the target model's ({target.vocab_size}); a draft model must "
                             "share the target's tokenizer.")
        native = native_context_length(hf_config)
        if native < target.max_model_len:
            raise ValueError(f"speculative_config.model={spec.model!r}: its context length {native} is shorter "
                             f"than max_model_len={target.max_model_len}; lower max_model_len.")
        return draft


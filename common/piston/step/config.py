"""Engine configuration: what every component of one engine instance agrees on.

``ModelConfig`` also gives the model's shape facts (layers, heads, KV heads, head size,
vocabulary, per-rank heads, KV bytes per block), derived from its Hugging Face config here
and nowhere else; the torch models, which see only the Hugging Face config, use the same
``hf_num_kv_heads`` and ``hf_head_dim``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from piston.step.tp_layout import HeadPartition, head_partition

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# CacheConfig.kv_cache_dtype: "auto" (the model's dtype) or one of these, and the other
# names vLLM and llama.cpp users type for them.
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
_KV_CACHE_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "f32": "float32", "fp16": "float16",
                           "half": "float16", "f16": "float16", "bf16": "bfloat16"}
MODEL_IMPLS = ("auto", "piston", "transformers")  # ModelConfig.model_impl


def parse_size(value: int | float | str, name: str = "kv_cache_memory") -> int:
    """Bytes from ``4GiB``, ``512MiB``, ``2G``, ``1e9`` or a plain number of bytes (``name``:
    the setting, for the error)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{name}: cannot read {value!r} as a size; use e.g. 4GiB or 512MiB.")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_kv_cache_dtype(value: str) -> str:
    """The canonical name of a ``kv_cache_dtype`` setting (``fp16`` -> ``float16``);
    ValueError naming the choices for anything else (fp8 among them: not stored yet)."""
    name = _KV_CACHE_DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={value!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)} "
                         "(fp8 caches are not implemented).")
    return name


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hf_num_kv_heads(hf_config: Any) -> int:
    """KV heads of a Hugging Face config (equal to the attention heads without GQA)."""
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def hf_head_dim(hf_config: Any) -> int:
    """The config's explicit head_dim, else hidden_size // num_attention_heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


@dataclass
class ModelConfig:
    """The model and how to run it."""

    model: str  # what the user named: a folder, a .gguf file or a hub id
    path: str = ""  # the resolved local folder or .gguf file
    tokenizer: str | None = None  # folder with tokenizer files; defaults to the model's
    dtype: str = "float32"
    max_model_len: int = 0  # 0 = the model's own context length
    seed: int = 0
    # "auto": the checkpoint's weights; "dummy": random weights in the checkpoint's
    # shapes (benchmarks of big models without downloading them; needs only config.json).
    load_format: str = "auto"
    # Run the model eagerly: no torch.compile, no graph capture.
    enforce_eager: bool = False
    # Never split attention over a prefix every running request shares (cascade attention);
    # platforms without cascade attention ignore it.
    disable_cascade_attn: bool = False
    # The most logprobs (and prompt logprobs) a request may ask for per position; -1: the vocabulary.
    max_logprobs: int = 20
    # How weights are held (piston.checkpoint.packed): "gguf" keeps a GGUF file's quantized
    # tensors packed, "int8" quantizes a float checkpoint's linear weights at load, "auto"
    # is "gguf" for a .gguf file, else "none"; "none" (and None) dequantizes everything.
    # EngineArgs fills it in ("auto" unless --quantization says otherwise).
    quantization: str | None = None
    # Which code runs the model (torch platforms; piston.models.registry.resolve_model_class):
    # "piston" its own model classes, "transformers" transformers' modelling code with
    # Piston's attention (the fallback), "auto" Piston's own where it has one.
    model_impl: str = "auto"
    hf_config: Any = None  # transformers.PretrainedConfig (piston.step.hf_config)

    @property
    def is_gguf(self) -> bool:
        return self.path.endswith(".gguf")

    # ----- shape facts, derived from hf_config here and nowhere else -------------------

    @property
    def architectures(self) -> list[str]:
        return list(getattr(self.hf_config, "architectures", None) or [])

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """KV heads of the whole model (equal to the attention heads without GQA)."""
        return hf_num_kv_heads(self.hf_config)

    @property
    def head_dim(self) -> int:
        return hf_head_dim(self.hf_config)

    def heads_of_rank(self, tp_size: int = 1, tp_rank: int = 0) -> HeadPartition:
        """The attention and KV heads one tensor-parallel rank computes and caches."""
        return head_partition(self.num_attention_heads, self.num_kv_heads, tp_size, tp_rank)

    def kv_bytes_per_block(self, block_size: int, num_kv_heads: int | None = None,
                           num_cache_layers: int | None = None, kv_cache_dtype: str | None = None) -> int:
        """Bytes of one KV block over every layer (or ``num_cache_layers`` layers: a hybrid
        model's, piston.step.kv_cache_layout), for ``num_kv_heads`` (default: all), with K
        and V stored as ``kv_cache_dtype`` (default: the model's dtype)."""
        heads = self.num_kv_heads if num_kv_heads is None else num_kv_heads
        layers = self.num_layers if num_cache_layers is None else num_cache_layers
        dtype = self.dtype if kv_cache_dtype in (None, "auto") else kv_cache_dtype
        return 2 * block_size * heads * self.head_dim * DTYPE_BYTES[dtype] * layers


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = the platform's default
    # How K and V are stored: "auto" (the model's dtype) or float32, float16, bfloat16 (a
    # platform's Platform.kv_cache_dtypes). Attention computes in the model's dtype: a
    # 16-bit cache under a float32 model rounds each K/V value once, when it is written,
    # and holds twice the tokens in the same memory.
    kv_cache_dtype: str = "auto"
    # Accelerators: the fraction of device memory the engine may use (weights, activations
    # and KV cache) when kv_cache_memory is not given. The CPU platform ignores it.
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_blocks: int = 0  # decided by the EngineCore from the workers' KVCacheReports
    # The prefix cache's second tier (piston.core.kv_offload): full blocks evicted from the
    # device pool are kept in host memory, up to this many bytes in all (0: no tier) ...
    kv_offloading_size: int = 0
    # ... and, past it, in files under this directory (None: no disk tier), up to
    # kv_offloading_disk_size bytes. The files outlive the engine: a restart finds them.
    kv_offloading_dir: str | None = None
    kv_offloading_disk_size: int = 16 * 2**30
    # The workers' store: "native" (piston.step.kv_transfer.KVTierStore) or "module:Class",
    # a class with its constructor and its apply/clear/close (an external KV store).
    kv_offloading_backend: str = "native"
    # Blocks each tier holds: decided by the EngineCore from the block size the workers report.
    kv_offload_host_blocks: int = 0
    kv_offload_disk_blocks: int = 0
    # A model mixing full and sliding-window layers keeps one block table for all layers,
    # freeing nothing behind the windows (piston.step.kv_cache_layout), as vLLM's flag.
    disable_hybrid_kv_cache_manager: bool = False

    @property
    def kv_offloading(self) -> bool:
        return self.enable_prefix_caching and bool(self.kv_offloading_size or self.kv_offloading_dir)


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    # The most catch-up tokens (prompts, chunks of prompts, recomputes after preemption)
    # one step computes; requests with one token to go (decodes) are not counted. None:
    # the platform's choice (Platform.check_and_update_config), 0: no cap. Needs chunked
    # prefill. A platform whose step time grows with its tokens (the CPU) caps it, so
    # prompts that arrive together are prefilled one after another.
    max_prefill_tokens: int | None = None
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    # The engine serves live clients (AsyncLLM: first-token latency matters) rather than
    # offline batches (LLM: throughput matters); platform defaults may differ by it.
    online: bool = False
    policy: str = "fcfs"  # "fcfs", "priority", "fair", or "module:Class" of a custom scheduler


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    # "uni" (one worker in the engine process), "mp" (one process per rank) or "ray".
    # None: "uni" for one rank, "mp" for more.
    distributed_executor_backend: str | None = None
    # "module:Class" mixed into every worker: its methods become collective_rpc targets.
    worker_extension_cls: str | None = None

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 else "mp"


@dataclass
class CompilationConfig:
    """How a platform compiles the model and captures graphs (see piston.compilation).

    ``mode``: "auto" lets the platform choose its default; "eager" runs the plain model;
    "piecewise" traces once, splits at attention and compiles each piece.
    """

    mode: str = "auto"
    # Batch sizes (in tokens) to capture graphs for; None = the platform's default
    # (1, 2, 4, 8, 16, ... up to max_num_seqs on CUDA).
    capture_sizes: list[int] | None = None
    # Where compiled artifacts are cached between start-ups; None = the user cache dir.
    cache_dir: str | None = None


@dataclass
class StructuredOutputsConfig:
    # "auto" (xgrammar where it imports, which needs torch; else llguidance), "xgrammar" or "guidance".
    backend: str = "auto"


SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# Filled in by the engine, never by the user.
_INTERNAL_SPECULATIVE_FIELDS = ("draft_model_config",)


@dataclass
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``speculative_config``): each step a proposer drafts up to
    ``num_speculative_tokens`` tokens per request, the target model checks them all in one
    forward pass, and a rejection sampler keeps the longest prefix that the target's own
    sampling would have produced (greedy: token for token; sampled: in distribution).

    ``method`` "ngram" (prompt lookup, no model): the longest n-gram, ``prompt_lookup_max``
    down to ``prompt_lookup_min`` tokens, that ends the sequence and occurred earlier in it
    proposes the tokens that followed its latest earlier occurrence. "draft_model": a smaller
    model with the target's vocabulary (``model``), run by the same workers with its own KV
    cache layers in the target's blocks, drafts greedily (piston.step.draft_proposer).
    "eagle": an EAGLE-1 head (``model``: its folder) that drafts from the target's features and
    shares its embedding and LM head (piston.models.eagle), run the same way. "eagle3": an
    EAGLE-3 head, which fuses three of the target's layers (piston.models.eagle3).
    "module:Class": a custom proposer (piston.step.proposer).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    model: str | None = None  # the draft model (draft_model, eagle); unused by ngram
    # How the draft model's weights are held (ModelConfig.quantization): "auto" is "gguf" for
    # a .gguf file; "none" dequantizes.
    quantization: str | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    # Speculation is skipped in steps with more running requests than this (where checking
    # drafts costs more than it saves); None: the platform's choice, 0: never skipped.
    disable_by_batch_size: int | None = None
    # The draft model resolved (EngineArgs.create_engine_config), for draft_model.
    draft_model_config: ModelConfig | None = None

    @property
    def uses_draft_model(self) -> bool:
        """Whether a model drafts (its KV cache shares the target's blocks, and each request
        needs KV slots past its scheduled tokens for the drafts' own passes)."""
        return self.method in ("draft_model", "eagle", "eagle3")

    @property
    def is_eagle(self) -> bool:
        """An EAGLE head drafts: it reads the target's hidden states."""
        return self.method in ("eagle", "eagle3")

    @property
    def is_eagle3(self) -> bool:
        """An EAGLE-3 head: it reads three of the target's layers (piston.models.eagle3)."""
        return self.method == "eagle3"

    @classmethod
    def from_value(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a dict or its JSON text (``--speculative-config '{"method": "ngram", ...}'``);
        ValueError naming the problem."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}.") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)} - set(_INTERNAL_SPECULATIVE_FIELDS)
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {unknown}; known: {sorted(names)}.")
        config = cls(**value)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.method, str) or (self.method not in SPECULATIVE_METHODS and ":" not in self.method):
            raise ValueError(f"speculative_config.method must be one of {list(SPECULATIVE_METHODS)} or "
                             f"module:Class of a custom proposer, got {self.method!r}.")
        if self.uses_draft_model and not (isinstance(self.model, str) and self.model):
            raise ValueError(f'speculative_config.model is required for method "{self.method}": the draft '
                             "model's (or EAGLE head's) folder, .gguf file or name.")
        if self.quantization not in (None, "auto", "gguf", "int8", "none"):
            raise ValueError(f"speculative_config.quantization must be auto, gguf, int8 or none, got "
                             f"{self.quantization!r}.")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {value!r}.")
        if self.num_speculative_tokens > 32:
            raise ValueError(f"speculative_config.num_speculative_tokens must be <= 32, got "
                             f"{self.num_speculative_tokens}.")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must not "
                             f"exceed prompt_lookup_max ({self.prompt_lookup_max}).")
        if self.disable_by_batch_size is not None and (
                not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 0):
            raise ValueError(f"speculative_config.disable_by_batch_size must be an integer >= 0, got "
                             f"{self.disable_by_batch_size!r}.")


@dataclass
class LoRAConfig:
    """Multi-LoRA serving (``--enable-lora``): requests may each name a PEFT adapter, and one
    step's rows may use different adapters (piston.step.lora_slots)."""

    max_loras: int = 1  # adapters in one batch: the device slots
    max_lora_rank: int = 16  # the largest rank an adapter may have (the slots' width)
    max_cpu_loras: int | None = None  # adapters kept in host memory, least recently used out; None: max_loras

    @property
    def host_capacity(self) -> int:
        return max(self.max_loras, self.max_cpu_loras or 0)

    def validate(self) -> None:
        for name, top in (("max_loras", 64), ("max_lora_rank", 512), ("max_cpu_loras", 4096)):
            value = getattr(self, name)
            if value is None and name == "max_cpu_loras":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise ValueError(f"{name} must be an integer in 1..{top}, got {value!r}.")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                             "the adapters of one batch are kept in host memory too.")


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    compilation_config: CompilationConfig = field(default_factory=CompilationConfig)
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    speculative_config: SpeculativeConfig | None = None
    platform: str = ""  # the platform's name, set by the engine at start-up
    lora_config: LoRAConfig | None = None  # None: LoRA adapters are off (--enable-lora turns them on)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @property
    def kv_cache_dtype(self) -> str:
        """The dtype K and V are stored in: ``CacheConfig.kv_cache_dtype`` with "auto"
        resolved to the model's dtype."""
        name = self.cache_config.kv_cache_dtype
        return self.model_config.dtype if name == "auto" else name

"""A PEFT LoRA adapter read from disk into host memory, checked against the base model.

Torch-free (numpy), so every platform loads adapters the same way; a platform then copies
each layer's matrices into its device slots (sharding them for tensor parallelism).

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, as
``PeftModel.save_pretrained`` writes them. Read:

- ``r`` and ``lora_alpha``, with ``rank_pattern`` / ``alpha_pattern`` per module; the
  scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``, folded into B;
- LoRA on q/k/v/o_proj and gate/up/down_proj of any decoder layer (``target_modules``,
  ``layers_to_transform``: whatever the file holds).

Refused, naming the problem (LoRAAdapterError, a ValueError): DoRA, LoRA biases,
``modules_to_save``, ``fan_in_fan_out``, other target modules (embeddings, the LM head),
a rank above ``max_lora_rank``, shapes that do not fit the base model.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from piston.step.config import hf_head_dim, hf_num_kv_heads
from piston.step.lora_request import LoRARequest

# The projections LoRA may adapt, in the order a layer runs them.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_name(layer: int, module: str) -> str:
    """A LoRA module's Hugging Face name, e.g. ``model.layers.3.self_attn.q_proj``."""
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


# Where a checkpoint's LoRA tensors live: [base_model.model.][model.]layers.N.<block>.<module>.lora_A|B[.adapter].weight
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                     r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# An adapter file larger than this is refused before it is read (a request-controlled size).
MAX_ADAPTER_BYTES = 4 << 30


class LoRAAdapterError(ValueError):
    """The adapter cannot be served: missing or broken files, or unsupported contents."""


@dataclass(frozen=True)
class LoRAModelDims:
    """The base model's shapes an adapter must fit: (in, out) features per module."""

    num_layers: int
    features: dict[str, tuple[int, int]]

    @classmethod
    def from_hf_config(cls, hf: Any) -> "LoRAModelDims":
        hidden, head_dim = hf.hidden_size, hf_head_dim(hf)
        q, kv, inter = hf.num_attention_heads * head_dim, hf_num_kv_heads(hf) * head_dim, hf.intermediate_size
        return cls(hf.num_hidden_layers, {
            "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)})


@dataclass
class LoRAAdapter:
    """An adapter's weights in float32: ``weights[(layer, module)] = (A [r, in], B [out, r])``
    with the scaling already applied to B, so a layer adds ``x @ A.T @ B.T``."""

    request: LoRARequest
    rank: int  # the largest rank of any module
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def lora_int_id(self) -> int:
        return self.request.lora_int_id

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def modules(self) -> set[str]:
        return {module for _, module in self.weights}


def load_adapter(request: LoRARequest, dims: LoRAModelDims, max_lora_rank: int) -> LoRAAdapter:
    """Read and check ``request.lora_path``; LoRAAdapterError naming what is wrong."""
    name, path = request.lora_name, request.lora_path
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: {path!r} is not a folder.")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: {path!r} has no adapter_config.json.") from None
    except (OSError, ValueError) as e:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: adapter_config.json is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: adapter_config.json must hold a JSON object.")
    _check_config(name, config)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        has_bin = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise LoRAAdapterError(f"LoRA adapter {name!r}: no adapter_model.safetensors in {path!r}"
                               + (" (a .bin adapter: save it with safe_serialization=True)." if has_bin else "."))
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(os.path.join(path, file), name))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _TENSOR.match(key)
        if m is None:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B matrix of a decoder "
                                   f"layer's {'/'.join(LORA_MODULES)}; Piston serves LoRA on those modules only.")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in dims.features:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: LoRA on {module!r} is not supported; supported "
                                   f"modules: {', '.join(LORA_MODULES)}.")
        if layer >= dims.num_layers:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: tensor {key!r} is for layer {layer}, but the base "
                                   f"model has {dims.num_layers} layers.")
        pairs.setdefault((layer, module), {})[which] = value
    if not pairs:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: its safetensors file holds no LoRA weights.")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    default_alpha = config.get("lora_alpha", config.get("r", 8))
    use_rslora = bool(config.get("use_rslora", False))
    adapter = LoRAAdapter(request, rank=0)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: layer {layer} {module} has lora_{''.join(ab)} "
                                   "but not its other half.")
        a, b = ab["A"], ab["B"]
        in_features, out_features = dims.features[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: layer {layer} {module}: lora_A {a.shape} and lora_B "
                                   f"{b.shape} are not [r, in] and [out, r].")
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: layer {layer} {module} maps {a.shape[1]} -> {b.shape[0]} "
                                   f"features, but the base model's maps {in_features} -> {out_features}: it was "
                                   "trained for another model.")
        rank = a.shape[0]
        if rank < 1 or rank > max_lora_rank:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: rank {rank} (layer {layer} {module}) exceeds "
                                   f"--max-lora-rank {max_lora_rank}.")
        full = module_name(layer, module)
        alpha = _pattern_value(alpha_pattern, full, default_alpha)
        declared = _pattern_value(rank_pattern, full, config.get("r", rank))
        if declared != rank:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: layer {layer} {module} has rank {rank}, but its "
                                   f"config says {declared}.")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise LoRAAdapterError(f"LoRA adapter {name!r}: lora_alpha must be a number, got {alpha!r}.")
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        a = np.ascontiguousarray(a, dtype=np.float32)
        b = np.ascontiguousarray(b, dtype=np.float32) * np.float32(scaling)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise LoRAAdapterError(f"LoRA adapter {name!r}: layer {layer} {module} holds NaN or infinite values.")
        adapter.weights[(layer, module)] = (a, b)
        adapter.rank = max(adapter.rank, rank)
    return adapter


def _check_config(name: str, config: dict) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoRAAdapterError(f"LoRA adapter {name!r}: peft_type is {peft_type!r}; only LORA adapters are served.")
    if config.get("use_dora"):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: DoRA (use_dora) is not supported.")
    if config.get("bias", "none") not in ("none", None):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: bias={config['bias']!r} is not supported (only 'none').")
    if config.get("modules_to_save"):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: modules_to_save {config['modules_to_save']} (fully trained "
                               "modules) is not supported.")
    if config.get("fan_in_fan_out"):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not "
                               "supported.")
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: r must be a positive integer, got {r!r}.")


def _pattern_value(patterns: dict, module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module's
    name (a regular expression, as PEFT reads it)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def read_safetensors(path: str, name: str = "") -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as float32 (bf16 widened), checking the header
    against the file's size (a truncated or foreign file is a LoRAAdapterError)."""
    size = os.path.getsize(path)
    if size > MAX_ADAPTER_BYTES:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: {os.path.basename(path)} is {size >> 20} MiB, over the "
                               f"{MAX_ADAPTER_BYTES >> 20} MiB limit.")
    bad = f"LoRA adapter {name!r}: {os.path.basename(path)} is not a valid safetensors file"
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise LoRAAdapterError(f"{bad} (too short).")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise LoRAAdapterError(f"{bad} (its header runs past the end).")
    try:
        header = json.loads(raw[8:8 + header_len])
    except ValueError:
        raise LoRAAdapterError(f"{bad} (its header is not JSON).") from None
    data = memoryview(raw)[8 + header_len:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            what = info.get("dtype") if isinstance(info, dict) else info
            raise LoRAAdapterError(f"{bad} (tensor {key!r}: dtype {what!r} unsupported or entry malformed; F32, "
                                   "F16, BF16 and F64 are read).") from None
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= start <= stop <= len(data) or stop - start != count * np.dtype(dtype).itemsize:
            raise LoRAAdapterError(f"{bad} (tensor {key!r} does not fit its byte range).")
        array = np.frombuffer(data[start:stop], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[key] = array.astype(np.float32)
    return out

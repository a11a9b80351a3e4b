"""GGUF files: a transformers config from the metadata, float32 tensors under HF names.

Tensors are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16 and every quant
type the gguf package implements). llama.cpp stores the q/k projections of the
``llama`` architecture with rows permuted for its interleaved RoPE; they are permuted
back exactly as transformers does, so the weights equal the original checkpoint's.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Iterator

import numpy as np
import torch

# general.architecture -> (transformers config class name, HF architectures name)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


@functools.lru_cache(maxsize=1)
def _reader(path: str, mtime: float, size: int):
    # Parsing the metadata takes ~1.5 s (the token list); config and weights share one reader.
    import gguf

    return gguf.GGUFReader(path)


def open_gguf(path: str):
    """A (cached) ``gguf.GGUFReader`` for ``path``."""
    st = os.stat(path)
    return _reader(os.path.abspath(path), st.st_mtime, st.st_size)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None if it has none."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def load_gguf_config(path: str):
    """A transformers config (Llama/Qwen2/Qwen3Config) built from the file's metadata.

    Raises ValueError for an architecture other than llama, qwen2 or qwen3.
    """
    import transformers

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}.")
    config_cls, hf_arch = GGUF_ARCHITECTURES[arch]

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    tensors = {t.name: t for t in reader.tensors}
    # The embedding's rows are the vocabulary the weights need (the token list may be shorter).
    vocab = int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors else \
        len(reader.fields["tokenizer.ggml.tokens"].data)
    kwargs: dict[str, Any] = dict(
        architectures=[hf_arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta("attention.head_count_kv", heads),
        head_dim=meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads,
        max_position_embeddings=meta("context_length", 2048),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=meta("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    scaling = meta("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope = {"rope_type": scaling, "factor": meta("rope.scaling.factor", 1.0)}
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = meta("rope.scaling.original_context_length")
            for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                if meta(f"rope.scaling.{gguf_key}") is not None:
                    rope[hf_key] = meta(f"rope.scaling.{gguf_key}")
        kwargs["rope_scaling"] = rope
    config = getattr(transformers, config_cls)(**kwargs)
    if "rope_freqs.weight" in tensors:
        # llama.cpp's per-dimension frequency divisors (Llama 3.1 scaling), read by get_rope.
        config.rope_freq_factors = _dequantize(tensors["rope_freqs.weight"]).reshape(-1).tolist()
    return config


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    w = dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a read-only view of the memory-mapped file: copy only then.
    if not w.flags.writeable or w.dtype != np.float32:
        w = np.array(w, dtype=np.float32)
    return w


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # transformers' LlamaTensorProcessor._reverse_permute_weights, for llama.cpp's q/k rows.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iterate_gguf_weights(path: str, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for each tensor of the file, dequantized.

    Tensors with no Hugging Face counterpart keep their llama.cpp name (the model's
    loader reports them); ``rope_freqs`` is skipped, since the config already holds it.
    """
    reader = open_gguf(path)
    permute = _field(reader, "general.architecture") == "llama"
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        w = _dequantize(tensor)
        if permute and tensor.name.startswith("blk.") and ".attn_q." in tensor.name:
            w = _reverse_permute(w, n_head)
        elif permute and tensor.name.startswith("blk.") and ".attn_k." in tensor.name:
            w = _reverse_permute(w, n_kv)
        yield gguf_hf_name(tensor.name) or tensor.name, torch.from_numpy(w)


def count_gguf_tensors(path: str) -> int:
    """How many tensors ``iterate_gguf_weights`` will yield (for a progress bar)."""
    return sum(t.name != "rope_freqs.weight" for t in open_gguf(path).tensors)

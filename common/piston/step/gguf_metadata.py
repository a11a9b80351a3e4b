"""A GGUF file's metadata: the cached reader, and a transformers config built from it.

The reader is ``gguf_file.GGUFFile`` (the header walked directly, values decoded when asked:
milliseconds, where ``gguf.GGUFReader`` took seconds over a tokenizer's token list), one per
file, shared with the tensor reader (piston.checkpoint.gguf_tensors).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from piston.step.hf_defaults import complete
from piston.step.plain_config import PlainConfig

# general.architecture -> (model_type, HF architectures name)
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


@functools.lru_cache(maxsize=1)
def _reader(path: str, mtime: float, size: int):
    from piston.step.gguf_file import GGUFFile, NotLittleEndian

    try:
        return GGUFFile(path)
    except NotLittleEndian:  # a big-endian file: gguf's reader swaps the bytes
        import gguf

        return gguf.GGUFReader(path)


def open_gguf(path: str):
    """A (cached) reader of ``path``'s metadata and tensors, with ``gguf.GGUFReader``'s
    ``fields`` and ``tensors``."""
    st = os.stat(path)
    return _reader(os.path.abspath(path), st.st_mtime, st.st_size)


def gguf_field(reader, key: str, default: Any = None) -> Any:
    """The value of metadata ``key``, or ``default`` when the file lacks it."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as a writable float32 numpy array (any type the gguf package reads)."""
    from gguf.quants import dequantize as gguf_dequantize

    w = gguf_dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a read-only view of the memory-mapped file: copy only then.
    if not w.flags.writeable or w.dtype != np.float32:
        w = np.array(w, dtype=np.float32)
    return w


def config_from_gguf(path: str):
    """A PlainConfig (as transformers' Llama/Qwen2/Qwen3/Gemma3TextConfig would have it) built
    from the file's metadata.

    Raises ValueError for an architecture other than llama, qwen2, qwen3 or gemma3.
    """

    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}.")
    model_type, hf_arch = GGUF_ARCHITECTURES[arch]

    def meta(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{arch}.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    tensors = {t.name: t for t in reader.tensors}
    # The embedding's rows are the vocabulary the weights need (the token list may be shorter).
    vocab = int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors else \
        len(gguf_field(reader, "tokenizer.ggml.tokens"))
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
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    if arch == "gemma3":
        # llama.cpp's Gemma 3: local layers rotate with base 10000 (not in the file), every
        # sixth layer is global, and q is scaled by 1/sqrt(head_dim), by 1/sqrt(hidden / heads)
        # for the 27B model (62 layers).
        kwargs.update(sliding_window=meta("attention.sliding_window"), rope_local_base_freq=10000.0,
                      query_pre_attn_scalar=hidden // heads if meta("block_count") == 62 else kwargs["head_dim"],
                      final_logit_softcapping=meta("final_logit_softcapping"),
                      attn_logit_softcapping=meta("attn_logit_softcapping"))
    scaling = meta("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope = {"rope_type": scaling, "factor": meta("rope.scaling.factor", 1.0)}
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = meta("rope.scaling.original_context_length")
            for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                if meta(f"rope.scaling.{gguf_key}") is not None:
                    rope[hf_key] = meta(f"rope.scaling.{gguf_key}")
        kwargs["rope_scaling"] = rope
    if "rope_freqs.weight" in tensors:
        # llama.cpp's per-dimension frequency divisors (Llama 3.1 scaling), read by the RoPE tables.
        kwargs["rope_freq_factors"] = dequantize(tensors["rope_freqs.weight"]).reshape(-1).tolist()
    return PlainConfig(complete(model_type, kwargs))

"""A GGUF file's tensors under Hugging Face names, dequantized to float32 numpy arrays.

Tensors are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16 and every quant
type the gguf package implements). llama.cpp stores the q/k projections of the ``llama``
architecture with rows permuted for its interleaved RoPE; they are permuted back exactly
as transformers does, so the weights equal the original checkpoint's.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np

from piston.step.gguf_metadata import dequantize, gguf_field, open_gguf

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


def gguf_hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None if it has none."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # transformers' LlamaTensorProcessor._reverse_permute_weights, for llama.cpp's q/k rows.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iterate_gguf_tensors(path: str, config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for each tensor of the file, dequantized.

    Tensors with no Hugging Face counterpart keep their llama.cpp name (the model's
    loader reports them); ``rope_freqs`` is skipped, since the config already holds it.
    """
    reader = open_gguf(path)
    permute = gguf_field(reader, "general.architecture") == "llama"
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        w = dequantize(tensor)
        if permute and tensor.name.startswith("blk.") and ".attn_q." in tensor.name:
            w = np.ascontiguousarray(_reverse_permute(w, n_head))
        elif permute and tensor.name.startswith("blk.") and ".attn_k." in tensor.name:
            w = np.ascontiguousarray(_reverse_permute(w, n_kv))
        yield gguf_hf_name(tensor.name) or tensor.name, w


def count_gguf_tensors(path: str) -> int:
    """How many tensors ``iterate_gguf_tensors`` will yield (for a progress bar)."""
    return sum(t.name != "rope_freqs.weight" for t in open_gguf(path).tensors)

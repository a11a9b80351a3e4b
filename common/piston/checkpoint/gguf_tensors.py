"""A GGUF file's tensors under Hugging Face names: packed as they are, or dequantized.

With ``packed``, every 2-D tensor of a type in ``GGUF_PACKED_TYPES`` comes as a
``PackedArray`` (its rows of blocks, unchanged); every other tensor is dequantized to a
float32 array with ``gguf.quants.dequantize`` (F32, F16, BF16 and every quant type the
gguf package implements), and the quantized ones among them are named in one log line.
llama.cpp stores the q/k projections of the ``llama`` architecture with rows permuted
for its interleaved RoPE; they are permuted back exactly as transformers does (whole
rows, so packed rows too), so the weights equal the original checkpoint's.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator

import numpy as np

from piston.checkpoint.packed import GGUF_PACKED_TYPES, PackedArray
from piston.step.gguf_metadata import dequantize, gguf_field, open_gguf

logger = logging.getLogger(__name__)

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
# Gemma 3's four norms per layer: llama.cpp's ffn_norm is the one before the MLP there.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def gguf_hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a llama.cpp tensor name of architecture ``arch``, or None
    if it has none."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    names = _GEMMA3_BLOCK_NAMES if arch == "gemma3" else _BLOCK_NAMES
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return None


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # transformers' LlamaTensorProcessor._reverse_permute_weights, for llama.cpp's q/k rows.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _stays_packed(tensor) -> bool:
    return len(tensor.shape) == 2 and tensor.tensor_type.name in GGUF_PACKED_TYPES


def _packed(tensor, file) -> PackedArray:
    """The tensor's rows as they are in the file, read into memory of their own: a copy out of
    a memory map would leave the file's pages mapped (counted resident) beside the copy."""
    cols = int(tensor.shape[0])  # GGUF lists dimensions innermost first
    rows = int(np.prod([int(d) for d in tensor.shape[1:]]))
    data = np.empty(int(tensor.n_bytes), dtype=np.uint8)
    view, done = memoryview(data), 0
    file.seek(int(tensor.data_offset))
    while done < data.size:  # one read() returns at most about 2 GiB
        got = file.readinto(view[done:])
        if not got:
            raise ValueError(f"{tensor.name}: the GGUF file ends inside this tensor's data.")
        done += got
    return PackedArray(tensor.tensor_type.name, data.reshape(rows, -1), cols)


def packed_tensor_formats(path: str) -> dict[str, str]:
    """``{hf_name: format}`` of the tensors ``iterate_gguf_tensors(packed=True)`` yields packed."""
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    return {gguf_hf_name(t.name, arch) or t.name: t.tensor_type.name for t in reader.tensors if _stays_packed(t)}


def iterate_gguf_tensors(path: str, config: Any, packed: bool = False
                         ) -> Iterator[tuple[str, np.ndarray | PackedArray]]:
    """Yield ``(hf_name, array)`` for each tensor of the file: a float32 array, or with
    ``packed`` a ``PackedArray`` for the tensors ``packed_tensor_formats`` names.

    Tensors with no Hugging Face counterpart keep their llama.cpp name (the model's
    loader reports them); ``rope_freqs`` is skipped, since the config already holds it.
    """
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    dequantized: list[str] = []
    with open(path, "rb", buffering=0) as file:
        yield from _tensors(reader, file, packed, arch, n_head, n_kv, dequantized)
    if dequantized:
        logger.info("Dequantized %d GGUF tensors to float32 at load (their types are not served packed): %s",
                    len(dequantized), ", ".join(dequantized))


def _tensors(reader, file, packed: bool, arch: str, n_head: int, n_kv: int, dequantized: list[str]):
    permute = arch == "llama"
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        keep = packed and _stays_packed(tensor)
        if packed and not keep and tensor.tensor_type.name not in ("F32", "F16", "BF16"):
            dequantized.append(f"{tensor.name} ({tensor.tensor_type.name})")
        w: Any = _packed(tensor, file) if keep else dequantize(tensor)
        heads = None
        if permute and tensor.name.startswith("blk.") and ".attn_q." in tensor.name:
            heads = n_head
        elif permute and tensor.name.startswith("blk.") and ".attn_k." in tensor.name:
            heads = n_kv
        if heads is not None and keep:
            w = PackedArray(w.fmt, np.ascontiguousarray(_reverse_permute(w.data, heads)), w.cols)
        elif heads is not None:
            w = np.ascontiguousarray(_reverse_permute(w, heads))
        if arch == "gemma3" and tensor.name.endswith("norm.weight"):
            w = w - np.float32(1)  # llama.cpp stores Gemma's norms as 1 + w; transformers' take w
        yield gguf_hf_name(tensor.name, arch) or tensor.name, w


def count_gguf_tensors(path: str) -> int:
    """How many tensors ``iterate_gguf_tensors`` will yield (for a progress bar)."""
    return sum(t.name != "rope_freqs.weight" for t in open_gguf(path).tensors)

"""Quantized GGUF files of the tiny test models, written with the ``gguf`` package (no torch).

``write_gguf(folder, path, formats)`` turns a Hugging Face llama folder (config.json +
model.safetensors) into a llama.cpp GGUF: tensors renamed, q/k rows permuted for
llama.cpp's interleaved RoPE (as its converter does; readers permute them back), every
2-D tensor quantized to the format ``formats(hf_name)`` names, and optionally the tokenizer
fields copied from another GGUF (SmolLM2's: the tiny models use its tokenizer).

The gguf package quantizes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and BF16; it only dequantizes
the K-quants, so ``quantize_k`` here writes Q4_K, Q5_K and Q6_K blocks with a plain
min/max fit (not llama.cpp's search; any valid blocks do, since the reference reads the
same blocks back with gguf's own dequantizer).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".")  # model.layers.<i>.<sub>.<sub>.weight
    return f"blk.{parts[2]}.{_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _k_scales_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per row -> the 12 packed bytes Q4_K/Q5_K decode."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    for j in range(4):
        out[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        out[:, j + 4] = (mn[:, j] & 63) | ((mn[:, j + 4] >> 4) << 6)
        out[:, j + 8] = (sc[:, j + 4] & 0x0F) | ((mn[:, j + 4] & 0x0F) << 4)
    return out


def quantize_k(w: np.ndarray, fmt: str) -> np.ndarray:
    """Rows of ``w`` (float32, width a multiple of 256) as Q4_K, Q5_K or Q6_K blocks."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(-1, 256)
    if fmt == "Q6_K":
        sub = x.reshape(-1, 16, 16)
        scale = np.abs(sub).max(axis=-1) / 31.0
        d = np.abs(scale).max(axis=-1, keepdims=True) / 127.0
        d = d.astype(np.float16).astype(np.float32)
        sc = np.where(d > 0, np.rint(scale / np.where(d > 0, d, 1)), 0).clip(-128, 127).astype(np.int8)
        step = (d * sc).reshape(-1, 16, 1)
        q = (np.rint(np.divide(sub, step, out=np.zeros_like(sub), where=step != 0)).clip(-32, 31) + 32)
        q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, h, k, l]
        ql = np.zeros((x.shape[0], 2, 2, 32), dtype=np.uint8)  # [block, h, k & 1, l]
        for k in range(4):
            ql[:, :, k & 1] |= (q[:, :, k] & 0x0F) << (4 * (k >> 1))
        qh = np.zeros((x.shape[0], 2, 32), dtype=np.uint8)
        for k in range(4):
            qh |= (q[:, :, k] >> 4) << (2 * k)
        blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)
        return blocks.reshape(rows, -1)
    levels = 15 if fmt == "Q4_K" else 31
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - lo) / levels
    d = (scale.max(axis=-1, keepdims=True) / 63.0).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(axis=-1, keepdims=True) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.where(d > 0, np.rint(scale / np.where(d > 0, d, 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmin > 0, np.rint(-lo / np.where(dmin > 0, dmin, 1)), 0).clip(0, 63).astype(np.uint8)
    step, shift = (d * sc)[..., None], (dmin * mn)[..., None]
    q = np.rint(np.divide(sub + shift, step, out=np.zeros_like(sub), where=step != 0)).clip(0, levels)
    q = q.astype(np.uint8)  # [block, j, l]
    qs = (q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)  # [block, 4, 32]
    parts = [_f16_bytes(d), _f16_bytes(dmin), _k_scales_bytes(sc, mn)]
    if fmt == "Q5_K":
        qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
        for j in range(8):
            qh |= ((q[:, j] >> 4) & 1) << j
        parts.append(qh)
    parts.append(qs.reshape(-1, 128))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def quantize(w: np.ndarray, fmt: str) -> tuple[np.ndarray, object]:
    """(data, raw dtype) for ``GGUFWriter.add_tensor``: float32, F16, or packed blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    if fmt == "F32":
        return w.astype(np.float32), None
    if fmt == "F16":
        return w.astype(np.float16), None
    qtype = GGMLQuantizationType[fmt]
    data = quantize_k(w, fmt) if fmt in ("Q4_K", "Q5_K", "Q6_K") else gguf_quantize(w.astype(np.float32), qtype)
    return np.ascontiguousarray(data), qtype


def _copy_tokenizer(writer, tokenizer_gguf: str) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(tokenizer_gguf)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)


def write_gguf(folder: str, path: str, formats: Callable[[str], str], tokenizer_gguf: str | None = None) -> str:
    """Write the llama model in ``folder`` as GGUF ``path``, 2-D tensor ``n`` in ``formats(n)``,
    with the tokenizer of ``tokenizer_gguf`` if given (without one, pass Piston a tokenizer
    folder; transformers loads the model from the file alone)."""
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(os.path.basename(path))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e4))
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, tokenizer_gguf)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for name, w in tensors.items():
        if name.endswith("q_proj.weight"):
            w = _permute(w, heads)
        elif name.endswith("k_proj.weight"):
            w = _permute(w, kv_heads)
        data, raw = quantize(w, formats(name)) if w.ndim == 2 else (w.astype(np.float32), None)
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Byte offsets of each block format's float16 scales (d, and m or dmin).
_SCALE_OFFSETS = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
                  "Q5_K": (0, 2), "Q6_K": (208,)}


def random_packed(fmt: str, rows: int, cols: int, rng: np.random.Generator):
    """A PackedArray of random rows in ``fmt``: random codes (every bit pattern a block may
    hold) with small finite float16 scales, or random floats for F32/F16/BF16/I8."""
    from piston.checkpoint.packed import FORMATS, PackedArray, quantize_int8

    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt == "I8":
        return quantize_int8(w)
    if fmt == "F32":
        return PackedArray(fmt, w.view(np.uint8), cols)
    if fmt == "F16":
        return PackedArray(fmt, w.astype(np.float16).view(np.uint8), cols)
    if fmt == "BF16":
        return PackedArray(fmt, (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), cols)
    spec = FORMATS[fmt]
    data = rng.integers(0, 256, (rows, spec.row_bytes(cols)), dtype=np.uint8)
    blocks = data.reshape(rows, -1, spec.block_bytes)
    for off in _SCALE_OFFSETS[fmt]:
        scales = (rng.standard_normal(blocks.shape[:2] + (1,)) * 0.05).astype(np.float16)
        blocks[..., off:off + 2] = scales.view(np.uint8)
    return PackedArray(fmt, data, cols)

"""Checkpoint weights for the JAX models (Llama family, Gemma 3), as numpy arrays stacked by layer.

The tensors come from the core's torch-free CheckpointReader (safetensors in numpy mode;
a GGUF file dequantized with the ``gguf`` package and cached as a safetensors folder
exactly as on the other platforms, so later start-ups on any platform read the copy).

With ``quantization="int8"`` the linear weights (qkv, o, gate_up, down) are held as int8
with a float32 scale per output channel (``<name>_scale``), quantized as every platform
does (piston.checkpoint.packed.int8_rows); the model multiplies by the scale after the
matmul. A GGUF's packed formats are dequantized here: the JAX models serve floats or int8.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from piston.checkpoint.checkpoint_reader import CheckpointReader
from piston.checkpoint.packed import int8_rows
from piston.step.config import ModelConfig
from tqdm import tqdm

from piston_tpu import moe

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))

# The stacked linear weights ([layers, out, in]) that --quantization int8 holds as int8 (an
# MoE model's shared expert too; its router and routed experts stay float, as on torch).
INT8_PARAMS = ("qkv", "o", "gate_up", "down", "shared_gate_up", "shared_down")

# Hugging Face sub-module name -> (stacked parameter, fused slot or None).
_LAYER_NAMES = {
    "input_layernorm.weight": ("in_norm", None),
    "post_attention_layernorm.weight": ("post_norm", None),
    "pre_feedforward_layernorm.weight": ("pre_ff_norm", None),  # Gemma's sandwich norms
    "post_feedforward_layernorm.weight": ("post_ff_norm", None),
    "self_attn.q_proj.weight": ("qkv", "q"), "self_attn.k_proj.weight": ("qkv", "k"),
    "self_attn.v_proj.weight": ("qkv", "v"),
    "self_attn.q_proj.bias": ("qkv_bias", "q"), "self_attn.k_proj.bias": ("qkv_bias", "k"),
    "self_attn.v_proj.bias": ("qkv_bias", "v"),
    "self_attn.o_proj.weight": ("o", None), "self_attn.o_proj.bias": ("o_bias", None),
    "self_attn.q_norm.weight": ("q_norm", None), "self_attn.k_norm.weight": ("k_norm", None),
    "mlp.gate_proj.weight": ("gate_up", "gate"), "mlp.up_proj.weight": ("gate_up", "up"),
    "mlp.down_proj.weight": ("down", None),
    "mlp.gate_proj.bias": ("gate_up_bias", "gate"), "mlp.up_proj.bias": ("gate_up_bias", "up"),
    "mlp.down_proj.bias": ("down_bias", None),
}


def param_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter of a ``LlamaSpec`` (layer parameters lead with num_layers)."""
    L, d, i = spec.num_layers, spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {"embed": (spec.vocab_size, d), "final_norm": (d,),
              "in_norm": (L, d), "post_norm": (L, d), "qkv": (L, q + 2 * kv, d), "o": (L, d, q),
              "gate_up": (L, 2 * i, d), "down": (L, d, i)}
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, d)
    if spec.qkv_bias:
        shapes["qkv_bias"] = (L, q + 2 * kv)
    if spec.o_bias:
        shapes["o_bias"] = (L, d)
    if spec.mlp_bias:
        shapes["gate_up_bias"] = (L, 2 * i)
        shapes["down_bias"] = (L, d)
    if spec.qk_norm:
        shapes["q_norm"] = (L, spec.head_dim)
        shapes["k_norm"] = (L, spec.head_dim)
    if spec.sandwich_norms:
        shapes["pre_ff_norm"] = (L, d)
        shapes["post_ff_norm"] = (L, d)
    if spec.all_sparse:  # no dense MLP anywhere
        for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
            shapes.pop(name, None)
    shapes.update(moe.param_shapes(spec))
    return shapes


def _expected_fill(spec, name: str, shape: tuple[int, ...]) -> int:
    """Values the checkpoint fills in parameter ``name``: in a model mixing dense and sparse
    layers, each kind's parameters only in that kind's layers (the others stay zero)."""
    size = int(np.prod(shape))
    if not spec.num_experts or spec.all_sparse:
        return size
    per_layer = size // spec.num_layers
    if name in moe.MOE_PARAMS:
        return per_layer * sum(spec.sparse_layers)
    if name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        return per_layer * (spec.num_layers - sum(spec.sparse_layers))
    return size


def _slot_rows(spec, param: str, slot: str | None) -> tuple[int, int] | None:
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    i = spec.intermediate_size
    offsets = {("qkv", "q"): (0, q), ("qkv", "k"): (q, kv), ("qkv", "v"): (q + kv, kv),
               ("gate_up", "gate"): (0, i), ("gate_up", "up"): (i, i)}
    if slot is None:
        return None
    return offsets[(param.removesuffix("_bias"), slot)]


def load_params(spec, model_config: ModelConfig, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Every parameter of ``spec`` as a numpy array of ``dtype``, filled from the checkpoint.

    ``load_format="dummy"`` gives small seeded random values instead. Raises ValueError
    for a missing parameter or a tensor whose shape does not match the config.
    """
    start = time.perf_counter()
    shapes = param_shapes(spec)
    if model_config.load_format == "dummy":
        rng = np.random.default_rng(model_config.seed)
        params = {name: (np.ones(shape, dtype) if "norm" in name
                         else rng.uniform(-1e-3, 1e-3, shape).astype(dtype)) for name, shape in shapes.items()}
        logger.info("Built random (dummy) weights in %.2f s.", time.perf_counter() - start)
        return _quantize(params, model_config)

    params = {name: (np.zeros if spec.num_experts else np.empty)(shape, dtype) for name, shape in shapes.items()}
    filled: dict[str, int] = {name: 0 for name in shapes}  # rows (or layers x rows) written
    unexpected: list[str] = []
    reader = CheckpointReader(model_config.path or model_config.model, model_config.hf_config)
    total = reader.count()
    for name, tensor in tqdm(reader.tensors(), total=total, desc="Loading weights", unit="tensor",
                             leave=False, disable=None):
        target, layer, rows = _place(spec, name)
        if target is None:
            if not ("rotary_emb.inv_freq" in name or (name == "lm_head.weight" and spec.tie_word_embeddings)):
                unexpected.append(name)
            continue
        filled[target] += _write(params, target, layer, rows, name, tensor)
    if unexpected:
        logger.warning("Skipped %d checkpoint tensors the model has no place for: %s",
                       len(unexpected), ", ".join(unexpected[:5]))
    missing = [n for n, a in params.items() if filled[n] != _expected_fill(spec, n, a.shape)]
    if missing:
        raise ValueError(f"The checkpoint does not provide {len(missing)} of the model's parameters "
                         f"(e.g. {', '.join(missing[:5])}); is it a {spec.architecture} checkpoint?")
    logger.info("Read %d checkpoint tensors in %.2f s.", total, time.perf_counter() - start)
    return _quantize(params, model_config)


_EAGLE_SHARED = ("embed_tokens.", "lm_head.", "norm.")  # the target's: not read from the head


def load_eagle_params(spec, model_config: ModelConfig, dtype: np.dtype) -> dict[str, np.ndarray]:
    """An EAGLE-1 head's parameters (piston.models.eagle's layout: ``fc.weight``, optional
    ``fc.bias``, ``layers.N.*``, an optional ``model.`` prefix): ``fc`` [h, 2h], ``fc_bias``,
    and the layer parameters of ``spec`` stacked by layer (layer 0's input norm, which the
    head does not have, is ones and unused)."""
    h = spec.hidden_size
    shapes = {n: shape for n, shape in param_shapes(spec).items() if n not in ("embed", "final_norm", "lm_head")}
    shapes["fc"] = (h, 2 * h)
    if model_config.load_format == "dummy":
        rng = np.random.default_rng(model_config.seed)
        return {name: (np.ones(shape, dtype) if "norm" in name else rng.uniform(-1e-3, 1e-3, shape).astype(dtype))
                for name, shape in shapes.items()}
    params = {name: np.zeros(shape, dtype) for name, shape in shapes.items()}
    params["in_norm"][0] = 1
    filled = {name: 0 for name in shapes}
    filled["in_norm"] = h
    reader = CheckpointReader(model_config.path or model_config.model, model_config.hf_config)
    for name, tensor in reader.tensors():
        name = name.removeprefix("model.")
        if name.startswith(_EAGLE_SHARED) or name == "layers.0.input_layernorm.weight":  # unused by EAGLE-1
            continue
        if name in ("fc.weight", "fc.bias"):
            target, layer, rows = ("fc" if name == "fc.weight" else "fc_bias"), None, None
            if target == "fc_bias":
                params["fc_bias"] = np.zeros(h, dtype)
                filled["fc_bias"] = 0
        else:
            target, layer, rows = _place(spec, "model." + name)
        if target is None:
            raise ValueError(f"EAGLE head tensor {name} has no place in the head.")
        filled[target] += _write(params, target, layer, rows, name, tensor)
    missing = [n for n, a in params.items() if filled[n] != a.size]
    if missing:
        raise ValueError(f"The EAGLE head's checkpoint does not provide {', '.join(missing)}.")
    return params


def load_eagle3_params(spec, model_config: ModelConfig, dtype: np.dtype) -> dict[str, np.ndarray]:
    """An EAGLE-3 head's parameters (piston.models.eagle3's layout; one layer): ``fc``
    [h, 3 * target hidden], ``hidden_norm``, layer 0's ``in_norm``, ``post_norm``, ``qkv``
    [q + 2kv, 2h], ``o``, ``gate_up``, ``down``, then ``norm``, ``lm_head`` [draft vocab, h],
    ``d2t`` (int32) and, when the checkpoint has one, its own ``embed``."""
    config = model_config.hf_config
    if spec.num_layers != 1:
        raise ValueError(f"EAGLE-3 heads of {spec.num_layers} layers are not supported on the TPU platform (1).")
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    target_hidden = getattr(config, "target_hidden_size", None) or h
    draft_vocab = getattr(config, "draft_vocab_size", None) or spec.vocab_size
    shapes = {"fc": (h, 3 * target_hidden), "hidden_norm": (h,), "in_norm": (1, h), "post_norm": (1, h),
              "qkv": (1, q + 2 * kv, 2 * h), "o": (1, h, q), "gate_up": (1, 2 * i, h), "down": (1, h, i),
              "norm": (h,), "lm_head": (draft_vocab, h)}
    if model_config.load_format == "dummy":
        rng = np.random.default_rng(model_config.seed)
        params = {name: (np.ones(shape, dtype) if "norm" in name else rng.uniform(-1e-3, 1e-3, shape).astype(dtype))
                  for name, shape in shapes.items()}
        params["d2t"] = np.zeros(draft_vocab, np.int32)
        return params
    params = {name: np.zeros(shape, dtype) for name, shape in shapes.items()}
    filled = {name: 0 for name in shapes}
    top = {"fc.weight": "fc", "norm.weight": "norm", "lm_head.weight": "lm_head", "embed_tokens.weight": "embed",
           "layers.0.hidden_norm.weight": "hidden_norm"}
    reader = CheckpointReader(model_config.path or model_config.model, model_config.hf_config)
    for name, tensor in reader.tensors():
        name = name.removeprefix("model.")
        name = "layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name
        if name == "t2d":
            continue
        if name == "d2t":
            params["d2t"] = np.asarray(tensor).astype(np.int32)
            continue
        if name == "embed_tokens.weight":
            params["embed"] = np.zeros(tensor.shape, dtype)
            filled["embed"] = 0
        target, layer, rows = (top[name], None, None) if name in top else _place(spec, "model." + name)
        if target is None:
            raise ValueError(f"EAGLE-3 head tensor {name} has no place in the head.")
        filled[target] += _write(params, target, layer, rows, name, tensor)
    missing = [n for n, a in params.items() if n in filled and filled[n] != a.size] + (
        [] if "d2t" in params else ["d2t"])
    if missing:
        raise ValueError(f"The EAGLE-3 head's checkpoint does not provide {', '.join(missing)}.")
    return params


def _write(params: dict[str, np.ndarray], target: str, layer: int | None, rows: tuple[int, int] | None, name: str,
           tensor: np.ndarray) -> int:
    """Copy checkpoint tensor ``name`` into its place (ValueError on a shape mismatch);
    returns the values written."""
    dst = params[target] if layer is None else params[target][layer]
    if rows is not None:
        dst = dst[rows[0]:rows[0] + rows[1]]
    if dst.shape != tensor.shape:
        raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, but the model expects "
                         f"{tuple(dst.shape)}: the config does not match the weights.")
    dst[...] = tensor.astype(dst.dtype, copy=False)
    return dst.size


def _quantize(params: dict[str, np.ndarray], model_config: ModelConfig) -> dict[str, np.ndarray]:
    """With quantization="int8": the linear weights as int8 and their per-output-channel scales."""
    if model_config.quantization != "int8":
        return params
    for name in INT8_PARAMS:
        if name in params:
            params[name], params[f"{name}_scale"] = int8_rows(params[name])
    logger.info("Quantized the linear weights to int8 per output channel (%s).",
                ", ".join(n for n in INT8_PARAMS if n in params))
    if "experts_gate_up" in params:
        logger.info("int8: the router and the routed experts stay in %s (no int8 grouped matmul yet).",
                    params["experts_gate_up"].dtype)
    return params


def _place(spec, name: str) -> tuple[str | None, int | None, tuple[int, int] | None]:
    """(parameter, layer or None, (row offset, rows) or None) for a Hugging Face tensor name."""
    top = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm"}
    if name in top:
        return top[name], None, None
    if name == "lm_head.weight":
        return (None if spec.tie_word_embeddings else "lm_head"), None, None
    parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")  # Mixtral names the block so
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None, None, None
    if spec.num_experts and parts[3] == "mlp" and (placed := _place_moe(spec, int(parts[2]), parts[4:])):
        return placed
    entry = _LAYER_NAMES.get(".".join(parts[3:]))
    layer = int(parts[2])
    if entry is None or layer >= spec.num_layers:
        return None, None, None
    param, slot = entry
    if param not in param_shapes(spec):
        return None, None, None
    return param, layer, _slot_rows(spec, param, slot)


# An expert's projection -> (stacked parameter, which half of the gate/up rows or None).
_EXPERT_PROJ = {"w1": ("experts_gate_up", 0), "gate_proj": ("experts_gate_up", 0), "w3": ("experts_gate_up", 1),
                "up_proj": ("experts_gate_up", 1), "w2": ("experts_down", None), "down_proj": ("experts_down", None)}


def _place_moe(spec, layer: int, rest: list[str]):
    """The place of an MoE tensor of ``layer`` (``rest``: its name after ``mlp.``), or None:
    the router, an expert's projection (one by one, or transformers' fused [E, ...] form),
    the shared expert and its gate."""
    if layer >= spec.num_layers or not spec.sparse_layers[layer]:
        return None
    i, name = spec.moe_intermediate_size, ".".join(rest)
    if name == "gate.weight":
        return "router", layer, None
    if len(rest) == 4 and rest[0] == "experts" and rest[1].isdigit() and rest[2] in _EXPERT_PROJ:
        param, half = _EXPERT_PROJ[rest[2]]
        return param, (layer, int(rest[1])), (None if half is None else (half * i, i))
    fused = {"experts.gate_up_proj": "experts_gate_up", "experts.down_proj": "experts_down",
             "shared_expert_gate.weight": "shared_gate", "shared_expert.down_proj.weight": "shared_down"}
    if name in fused:
        return fused[name], layer, None
    s = spec.shared_intermediate_size
    if name in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"):
        return "shared_gate_up", layer, (0 if "gate_proj" in name else s, s)
    return None


def updated_params(spec, params: dict, named: list[tuple[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], int]:
    """For a weight update: the stacked parameters that ``named`` (Hugging Face names, full
    tensors) touch, as host copies of ``params``' arrays with the new values written, and
    how many tensors were applied. Every name and shape is checked before anything is
    written (ValueError); a tied model's ``lm_head.weight`` is skipped, as at load."""
    shapes = param_shapes(spec)
    places = []
    unknown = []
    for name, tensor in named:
        target, layer, rows = _place(spec, name)
        if target is None:
            if not (name == "lm_head.weight" and spec.tie_word_embeddings):
                unknown.append(name)
            continue
        if f"{target}_scale" in params:
            raise ValueError(f"weight {name}: this model holds {target} quantized; update_weights replaces "
                             "float weights only.")
        shape = shapes[target][1:] if layer is not None else shapes[target]
        if rows is not None:
            shape = (rows[1], *shape[1:])
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, but the model expects "
                             f"{tuple(shape)}.")
        places.append((target, layer, rows, tensor))
    if unknown:
        raise ValueError(f"{len(unknown)} weights have no place in this {spec.architecture} "
                         f"(e.g. {', '.join(unknown[:5])}); use the checkpoint's Hugging Face names.")
    changed = {target: np.array(params[target]) for target, *_ in places}
    for target, layer, rows, tensor in places:
        dst = changed[target] if layer is None else changed[target][layer]
        if rows is not None:
            dst = dst[rows[0]:rows[0] + rows[1]]
        dst[...] = tensor.astype(dst.dtype, copy=False)
    return changed, len(places)

"""The Llama family and Gemma 3 in JAX: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 3 (text).

A pure function of (params, kv_cache, step inputs), traced once per token bucket. The
decoder layers run under ``lax.scan`` over weights stacked by layer, so XLA compiles one
layer body whatever the depth. All of a step's tokens arrive flattened, ``[num_tokens]``;
the attention function reads the paged cache through the step's metadata. The arithmetic
follows the torch models (and so transformers) operation by operation, in ``dtype``.

With LoRA slots in the parameters (piston_tpu.lora) and the step's ``lora_slots``, each
projection adds its tokens' adapter deltas.

Per-layer facts ride in the scan beside the weights: each layer's sliding window (0: the
whole context; piston.step.layer_types), which RoPE table it rotates with (Gemma 3's
local and global layers have their own) and, with a hybrid KV cache layout
(piston.step.kv_cache_layout), its KV cache group and cache tensor: the layer writes and
reads slot ``layer_cache`` of the cache's layer axis through its group's slot mapping and
page table, picked from the step's metadata by a dynamic index. Gemma 3 also brings norms that scale by
``1 + weight``, sandwich norms around attention and the MLP, a scaled embedding, its own
query scale and optional final-logit soft-capping, all switched by the spec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from piston.step.layer_types import FULL, layer_types, rope_config, sliding_windows
from piston.step.rope import rope_tables
from piston_tpu import lora
from piston_tpu.attention_metadata import AttentionMetadata, group_metadata
from piston_tpu.moe import MOE_ARCHITECTURES, MOE_PARAMS, moe_fields, moe_mlp
from piston_tpu.kv_cache import write_kv

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Gemma3ForCausalLM", *MOE_ARCHITECTURES)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclass(frozen=True)
class LlamaSpec:
    """The static shape of a Llama-family model, read from its Hugging Face config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    # Each layer's sliding window (0: whole context) and RoPE table (an index into
    # ``rope_kinds``, the layer types whose tables the runner builds, in that order).
    layer_windows: tuple[int, ...] = ()
    layer_rope: tuple[int, ...] = ()
    rope_kinds: tuple[str, ...] = (FULL,)
    # Gemma 3: norms scale by 1 + weight, sandwich norms, embedding scale, query scale (0:
    # head_dim ** -0.5) and final-logit soft-capping (0: none).
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: float = 0.0
    attn_scale: float = 0.0
    final_logit_softcapping: float = 0.0
    # Mixture of experts (piston_tpu.moe; 0 experts: a dense model): top-k routing, expert
    # and shared-expert widths, and which layers are sparse (1) or dense Llama MLPs (0).
    num_experts: int = 0
    experts_per_tok: int = 0
    renormalize: bool = False
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    sparse_layers: tuple[int, ...] = ()
    # A hybrid KV cache layout (piston.step.kv_cache_layout; the runner sets it): each layer's
    # group (its slot mapping and page table) and cache tensor. Empty: one group, layer l in
    # tensor l.
    layer_group: tuple[int, ...] = ()
    layer_cache: tuple[int, ...] = ()

    @property
    def all_sparse(self) -> bool:
        return bool(self.num_experts) and all(self.sparse_layers)

    @property
    def query_scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    @classmethod
    def from_model_config(cls, model_config: Any, architecture: str | None = None) -> "LlamaSpec":
        """Raises ValueError for an architecture or activation the JAX models do not implement
        (``architecture``: instead of the config's, e.g. for an EAGLE head's Llama layers)."""
        config = model_config.hf_config
        names = [architecture] if architecture else model_config.architectures
        arch = next((n for n in names if n in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"Model architecture {names or '(none given)'} is not supported on the TPU "
                             f"platform; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
        gemma = arch == "Gemma3ForCausalLM"
        act = getattr(config, "hidden_activation" if gemma else "hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}.")
        attention_bias = bool(getattr(config, "attention_bias", False))
        types = layer_types(config) if architecture is None else [FULL] * model_config.num_layers
        kinds = tuple(sorted(set(types)))
        windows = sliding_windows(config) if architecture is None else [None] * model_config.num_layers
        extra: dict[str, Any] = dict(layer_windows=tuple(w or 0 for w in windows),
                                     layer_rope=tuple(kinds.index(t) for t in types), rope_kinds=kinds)
        extra.update(moe_fields(config, arch, model_config.num_layers))
        if gemma:
            if getattr(config, "attn_logit_softcapping", None) is not None:
                raise ValueError("attn_logit_softcapping is set: attention-score soft-capping (Gemma 2) is not "
                                 "implemented by Piston's attention kernels.")
            if getattr(config, "use_bidirectional_attention", False):
                raise ValueError("use_bidirectional_attention=True (Gemma 3 embedding models) is not supported.")
            extra.update(norm_offset=1.0, sandwich_norms=True, embed_scale=float(config.hidden_size) ** 0.5,
                         attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
                         final_logit_softcapping=float(getattr(config, "final_logit_softcapping", None) or 0.0))
        return cls(
            architecture=arch,
            vocab_size=model_config.vocab_size,
            hidden_size=model_config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=model_config.num_layers,
            num_heads=model_config.num_attention_heads,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            hidden_act=act,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", gemma)),
            qkv_bias=True if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM") else attention_bias,
            o_bias=False if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM") else attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM"),
            **extra,
        )


def rope_arrays(spec: LlamaSpec, hf_config: Any, max_position: int) -> tuple[tuple[jax.Array, jax.Array], int]:
    """((cos, sin), rotary_dim): the RoPE tables of ``spec.rope_kinds``, stacked
    [kinds, max_position, rotary_dim / 2], the ``rope`` argument of ``forward``."""
    tables = [rope_tables(rope_config(hf_config, kind), spec.head_dim, max_position) for kind in spec.rope_kinds]
    if len({t.rotary_dim for t in tables}) != 1:
        raise ValueError("Layers of one model must rotate the same number of channels.")
    cos = jnp.asarray(np.stack([t.cos for t in tables]))
    sin = jnp.asarray(np.stack([t.sin for t in tables]))
    return (cos, sin), tables[0].rotary_dim


AttentionFn = Callable[..., jax.Array]
"""(q [T, H, D], kv_cache, layer index, metadata, window=0) -> [T, H, D]; see attention_metadata.
``window``: the layer's sliding window (a traced int32 under the scan; 0 = whole context)."""


def _linear(x: jax.Array, w: jax.Array, precision, scale: jax.Array | None = None) -> jax.Array:
    # w is [out, in] as in the checkpoint: contract the last dims, no transposed copy. An int8
    # w (--quantization int8) is widened to x's dtype in the product, and its per-output-channel
    # scale applied to the result: x @ (q * s).T == (x @ q.T) * s.
    if scale is None:
        return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision)
    out = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())), precision=precision)
    return out * scale.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """Hugging Face's LlamaRMSNorm: normalize in float32, scale in the input dtype. With
    ``offset`` (Gemma: 1.0), Gemma3RMSNorm: scale by offset + weight in float32, then cast."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (xf * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dim: int) -> jax.Array:
    """Rotate-half RoPE on the first ``rotary_dim`` channels of x [T, heads, D]."""
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    return jnp.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), axis=-1)


_LAYER_PARAMS = ("in_norm", "post_norm", "pre_ff_norm", "post_ff_norm", "qkv", "qkv_bias", "o", "o_bias",
                 "gate_up", "gate_up_bias", "down", "down_bias", "q_norm", "k_norm", "qkv_scale", "o_scale",
                 "gate_up_scale", "down_scale", "shared_gate_up_scale", "shared_down_scale", *MOE_PARAMS,
                 *lora.PARAM_NAMES)


def _lora(y: jax.Array, x: jax.Array, lp: dict[str, jax.Array], group: str, one_hot: jax.Array | None,
          precision) -> jax.Array:
    """y plus the LoRA delta of fused layer ``group`` (when the model has LoRA slots)."""
    if one_hot is None or f"lora_a_{group}" not in lp:
        return y
    modules = dict(lora.GROUPS)[group]
    return y + lora.delta(x, lp[f"lora_a_{group}"], [lp[f"lora_b_{m}"] for m in modules], one_hot, precision)


def _decoder_layer(h: jax.Array, residual: jax.Array, cache: jax.Array, lp: dict[str, jax.Array], index,
                   cos: jax.Array, sin: jax.Array, md: AttentionMetadata, *, spec: LlamaSpec,
                   attention: AttentionFn, rotary_dim: int, precision, input_norm: bool = True,
                   lora_one_hot: jax.Array | None = None, window=0, sparse=0
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer: (h, residual, cache) -> (h, residual, cache); the layer's input is
    ``h + residual``, normalized unless ``input_norm`` is False (an EAGLE head's first
    layer). ``index``: the layer's tensor in the cache's layer axis; ``md``: its KV cache
    group's metadata. ``lora_one_hot`` [T, slots]: each token's LoRA slot (piston_tpu.lora);
    ``window``: the layer's sliding window (0: none); ``sparse``: 1 for an MoE layer."""
    t = h.shape[0]
    h_, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q_size, kv_size = h_ * d, kvh * d
    inter = spec.intermediate_size
    eps, off = spec.rms_norm_eps, spec.norm_offset
    residual = h + residual
    x = rms_norm(residual, lp["in_norm"], eps, off) if input_norm else residual
    qkv = _linear(x, lp["qkv"], precision, lp.get("qkv_scale"))
    if "qkv_bias" in lp:
        qkv = qkv + lp["qkv_bias"]
    qkv = _lora(qkv, x, lp, "qkv", lora_one_hot, precision)
    q = qkv[:, :q_size].reshape(t, h_, d)
    k = qkv[:, q_size:q_size + kv_size].reshape(t, kvh, d)
    v = qkv[:, q_size + kv_size:].reshape(t, kvh, d)
    if spec.qk_norm:
        q = rms_norm(q, lp["q_norm"], eps, off)
        k = rms_norm(k, lp["k_norm"], eps, off)
    q = apply_rope(q, cos, sin, rotary_dim)
    k = apply_rope(k, cos, sin, rotary_dim)
    cache = write_kv(cache, index, k, v, md.slot_mapping)
    o = attention(q, cache, index, md, window=window).reshape(t, q_size)
    h = _linear(o, lp["o"], precision, lp.get("o_scale"))
    if "o_bias" in lp:
        h = h + lp["o_bias"]
    h = _lora(h, o, lp, "o", lora_one_hot, precision)
    if spec.sandwich_norms:  # Gemma: the attention output is normalized before the residual add
        h = rms_norm(h, lp["post_norm"], eps, off)
    residual = h + residual
    x = rms_norm(residual, lp["pre_ff_norm" if spec.sandwich_norms else "post_norm"], eps, off)

    def dense(x):
        gate_up = _linear(x, lp["gate_up"], precision, lp.get("gate_up_scale"))
        if "gate_up_bias" in lp:
            gate_up = gate_up + lp["gate_up_bias"]
        gate_up = _lora(gate_up, x, lp, "gate_up", lora_one_hot, precision)
        act = _ACTIVATIONS[spec.hidden_act](gate_up[:, :inter]) * gate_up[:, inter:]
        h = _linear(act, lp["down"], precision, lp.get("down_scale"))
        if "down_bias" in lp:
            h = h + lp["down_bias"]
        return _lora(h, act, lp, "down", lora_one_hot, precision)

    def experts(x):
        return moe_mlp(x, lp, spec, _ACTIVATIONS[spec.hidden_act], precision, _linear)

    if not spec.num_experts:
        h = dense(x)
    elif spec.all_sparse:
        h = experts(x)
    else:  # Qwen's dense layers among sparse ones: both parameter sets are stacked
        h = lax.cond(sparse > 0, experts, dense, x)
    if spec.sandwich_norms:
        h = rms_norm(h, lp["post_ff_norm"], eps, off)
    return h, residual, cache


def forward(params: dict[str, jax.Array], rope: tuple[jax.Array, jax.Array], kv_cache: jax.Array,
            input_ids: jax.Array, positions: jax.Array, md: AttentionMetadata, sample_idx: jax.Array,
            lora_slots: jax.Array | None = None, *, spec: LlamaSpec, attention: AttentionFn, rotary_dim: int,
            precision=None, aux_layers: tuple[int, ...] = ()) -> tuple[jax.Array, ...]:
    """One step over T flattened tokens (``lora_slots`` [T] int32: each token's LoRA slot,
    the number of slots for none, when the parameters hold LoRA slots). ``md``: the step's
    metadata, per KV cache group (a leading group axis) or of one group (none).

    Returns (hidden [T, hidden], hidden rows ``sample_idx`` [S, hidden], the updated cache),
    and with ``aux_layers`` (an EAGLE-3 head drafts) the inputs of those layers,
    concatenated [T, len(aux_layers) * hidden].
    """
    # rope: (cos, sin), each [kinds, positions, rotary_dim / 2] (piston_tpu.model_runner.rope_arrays).
    cos_all, sin_all = jnp.asarray(rope[0])[:, positions], jnp.asarray(rope[1])[:, positions]
    stacked = {n: params[n] for n in _LAYER_PARAMS if n in params}
    windows = jnp.asarray(spec.layer_windows or (0,) * spec.num_layers, jnp.int32)
    kinds = jnp.asarray(spec.layer_rope or (0,) * spec.num_layers, jnp.int32)
    sparse = jnp.asarray(spec.sparse_layers or (0,) * spec.num_layers, jnp.int32)
    caches = jnp.asarray(spec.layer_cache or tuple(range(spec.num_layers)), jnp.int32)
    groups = jnp.asarray(spec.layer_group or (0,) * spec.num_layers, jnp.int32)
    num_groups = md.slot_mapping.shape[0] if md.slot_mapping.ndim == 2 else 1
    if max(spec.layer_group or (0,)) >= num_groups:
        raise ValueError(f"the model's layers use {max(spec.layer_group) + 1} KV cache groups, the step's "
                         f"metadata has {num_groups}.")
    one_group = group_metadata(md, 0) if num_groups == 1 else None  # picked once, outside the scan

    def layer(carry, xs):
        lp, index, cache_index, group, window, kind, is_sparse = xs
        h, residual, cache, aux = carry
        for j, layer_id in enumerate(aux_layers):  # keep the stream entering the aux layers
            aux = aux.at[j].set(jnp.where(index == layer_id, h + residual, aux[j]))
        layer_md = one_group if one_group is not None else group_metadata(md, group)
        h, residual, cache = _decoder_layer(h, residual, cache, lp, cache_index, cos_all[kind], sin_all[kind],
                                            layer_md, spec=spec, attention=attention, rotary_dim=rotary_dim,
                                            precision=precision, lora_one_hot=one_hot, window=window,
                                            sparse=is_sparse)
        return (h, residual, cache, aux), None

    h = params["embed"][input_ids]
    if spec.embed_scale:  # transformers rounds the scale to the weights' dtype first
        h = h * jnp.asarray(spec.embed_scale, h.dtype)
    one_hot = None
    if lora_slots is not None and "lora_a_qkv" in params:
        one_hot = lora.token_one_hot(lora_slots, params["lora_a_qkv"].shape[1], h.dtype)
    aux = jnp.zeros((len(aux_layers), *h.shape), h.dtype)
    carry = (h, jnp.zeros_like(h), kv_cache, aux)
    (h, residual, kv_cache, aux), _ = lax.scan(layer, carry, (stacked, jnp.arange(spec.num_layers), caches, groups,
                                                              windows, kinds, sparse))
    hidden = rms_norm(h + residual, params["final_norm"], spec.rms_norm_eps, spec.norm_offset)
    if aux_layers:
        return hidden, hidden[sample_idx], kv_cache, jnp.concatenate(list(aux), axis=-1)
    return hidden, hidden[sample_idx], kv_cache


def eagle_forward(params: dict[str, jax.Array], rope: tuple[jax.Array, jax.Array], kv_cache: jax.Array,
                  input_ids: jax.Array, positions: jax.Array, md: AttentionMetadata, features: jax.Array,
                  sample_idx: jax.Array, embed: jax.Array, *, spec: LlamaSpec, attention: AttentionFn,
                  rotary_dim: int, precision=None) -> tuple[jax.Array, jax.Array]:
    """An EAGLE-1 head (piston.models.eagle) over T tokens: ``input_ids[t]`` is the token
    after ``positions[t]``, ``features`` [T, hidden] the target's (or the head's) features
    there, ``embed`` the target's embedding. Returns (the head's outputs at ``sample_idx``
    [S, hidden], the updated cache)."""
    md = group_metadata(md, 0)  # a head is never hybrid: one KV cache group
    cos, sin = rope[0][0, positions], rope[1][0, positions]
    x = jnp.concatenate([embed[input_ids], features.astype(embed.dtype)], axis=-1)
    h = _linear(x, params["fc"], precision)
    if "fc_bias" in params:
        h = h + params["fc_bias"]
    residual, cache = jnp.zeros_like(h), kv_cache
    for i in range(spec.num_layers):  # a head has a layer or two: unrolled, the first without input norm
        lp = {n: params[n][i] for n in _LAYER_PARAMS if n in params}
        h, residual, cache = _decoder_layer(h, residual, cache, lp, i, cos, sin, md, spec=spec, attention=attention,
                                            rotary_dim=rotary_dim, precision=precision, input_norm=i > 0)
    out = h + residual
    return out[sample_idx], cache


def eagle3_forward(params: dict[str, jax.Array], rope: tuple[jax.Array, jax.Array], kv_cache: jax.Array,
                   input_ids: jax.Array, positions: jax.Array, md: AttentionMetadata, features: jax.Array,
                   sample_idx: jax.Array, embed: jax.Array, *, spec: LlamaSpec, attention: AttentionFn,
                   rotary_dim: int, precision=None, norm_before_residual: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
    """An EAGLE-3 head (piston.models.eagle3) of one layer over T tokens: ``features`` [T, h]
    (the fused aux layers, or the head's own last outputs), ``embed``: the head's embedding
    or the target's. Returns (outputs before the final norm at ``sample_idx``, the cache)."""
    t = input_ids.shape[0]
    h_, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q_size, kv_size = h_ * d, kvh * d
    eps, inter = spec.rms_norm_eps, spec.intermediate_size
    md = group_metadata(md, 0)  # a head is never hybrid: one KV cache group
    cos, sin = rope[0][0, positions], rope[1][0, positions]
    embeds = rms_norm(embed[input_ids], params["in_norm"][0], eps)
    features = features.astype(embeds.dtype)
    if norm_before_residual:
        hn = residual = rms_norm(features, params["hidden_norm"], eps)
    else:
        residual, hn = features, rms_norm(features, params["hidden_norm"], eps)
    qkv = _linear(jnp.concatenate([embeds, hn], axis=-1), params["qkv"][0], precision)
    q = apply_rope(qkv[:, :q_size].reshape(t, h_, d), cos, sin, rotary_dim)
    k = apply_rope(qkv[:, q_size:q_size + kv_size].reshape(t, kvh, d), cos, sin, rotary_dim)
    v = qkv[:, q_size + kv_size:].reshape(t, kvh, d)
    cache = write_kv(kv_cache, 0, k, v, md.slot_mapping)
    o = _linear(attention(q, cache, 0, md).reshape(t, q_size), params["o"][0], precision)
    residual = o + residual
    x = rms_norm(residual, params["post_norm"][0], eps)
    gate_up = _linear(x, params["gate_up"][0], precision)
    h = _linear(_ACTIVATIONS[spec.hidden_act](gate_up[:, :inter]) * gate_up[:, inter:], params["down"][0], precision)
    return (h + residual)[sample_idx], cache


def eagle3_tokens(params: dict[str, jax.Array], outputs: jax.Array, eps: float, precision=None) -> jax.Array:
    """An EAGLE-3 head's greedy tokens, in the target's vocabulary, from its outputs [N, h]."""
    logits = _linear(rms_norm(outputs, params["norm"], eps), params["lm_head"], precision)
    best = jnp.argmax(logits.astype(jnp.float32), axis=-1)
    return (best + params["d2t"][best]).astype(jnp.int32)


def compute_logits(params: dict[str, jax.Array], hidden: jax.Array, precision=None, softcap: float = 0.0
                   ) -> jax.Array:
    """[N, hidden] -> [N, vocab] float32 logits (tied models read the embedding matrix),
    soft-capped to (-softcap, softcap) as transformers does when ``softcap`` is set."""
    weight = params["lm_head"] if "lm_head" in params else params["embed"]
    logits = _linear(hidden, weight, precision)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits.astype(jnp.float32)

"""Mixture-of-experts MLPs in JAX: Mixtral, Qwen2-MoE and Qwen3-MoE on the TPU plugin.

A layer's experts are stacked as the torch models hold them (piston.models.layers.fused_moe):
``experts_gate_up`` [E, 2 * I, H] (each expert's gate rows, then its up rows) and
``experts_down`` [E, H, I]. A step's (token, choice) pairs are sorted by expert, so each
expert's rows form one group, and both projections are one ``lax.ragged_dot_general``
each: XLA's grouped matmul (Mosaic's on a TPU), with static shapes whatever the routing.
The k results of a token are weighted and summed back in expert order, as transformers'
loop over experts adds them. Qwen2-MoE adds a shared expert scaled by
``sigmoid(shared_gate(x))``; Qwen's dense layers (``mlp_only_layers``,
``decoder_sparse_step``) keep the Llama MLP, chosen per layer inside the layer scan.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

# Parameters of a sparse layer, stacked by layer like the others (piston_tpu.weights).
MOE_PARAMS = ("router", "experts_gate_up", "experts_down", "shared_gate_up", "shared_down", "shared_gate")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")

# Contract x [M, H] with w [E, N, H] on H, x's rows grouped by expert.
_GROUPED = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                         lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))


def moe_fields(config: Any, arch: str, num_layers: int) -> dict[str, Any]:
    """The LlamaSpec fields of an MoE architecture (empty for a dense one): expert count,
    top-k, renormalisation, expert and shared-expert widths, and which layers are sparse."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    value = getattr(config, "num_experts", None)
    experts = int(config.num_local_experts if value is None else value)
    if arch == "MixtralForCausalLM":
        sparse = [True] * num_layers
        width, renorm, shared = config.intermediate_size, True, 0
    else:
        step = getattr(config, "decoder_sparse_step", 1) or 1
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]
        width, renorm = config.moe_intermediate_size, bool(config.norm_topk_prob)
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0) if arch == "Qwen2MoeForCausalLM" \
            else 0
    return dict(num_experts=experts, experts_per_tok=int(config.num_experts_per_tok), renormalize=renorm,
                moe_intermediate_size=int(width), shared_intermediate_size=shared,
                sparse_layers=tuple(int(s) for s in sparse))


def param_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Shapes of the MoE parameters of ``spec`` (stacked over every layer; dense layers' rows stay zero)."""
    if not spec.num_experts:
        return {}
    L, h, e, i = spec.num_layers, spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
    shapes = {"router": (L, e, h), "experts_gate_up": (L, e, 2 * i, h), "experts_down": (L, e, h, i)}
    if spec.shared_intermediate_size:
        s = spec.shared_intermediate_size
        shapes.update(shared_gate_up=(L, 2 * s, h), shared_down=(L, h, s), shared_gate=(L, 1, h))
    return shapes


def moe_mlp(x: jax.Array, lp: dict[str, jax.Array], spec, act: Callable[[jax.Array], jax.Array],
            precision, linear: Callable[..., jax.Array]) -> jax.Array:
    """One sparse layer's MLP over x [T, H]: routed experts (plus the gated shared expert).
    ``linear(x, w, precision, scale)`` is the model's dense product, for the shared expert
    (int8 with --quantization int8, as the dense MLPs; the router and the experts stay float)."""
    t, h = x.shape
    k, i = spec.experts_per_tok, spec.moe_intermediate_size
    logits = lax.dot_general(x, lp["router"], (((1,), (1,)), ((), ())), precision=precision)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = lax.top_k(probs, k)
    if spec.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # (token, choice) pairs grouped by expert
    token = order // k
    sizes = jnp.bincount(flat_ids, length=spec.num_experts).astype(jnp.int32)
    gate_up = lax.ragged_dot_general(x[token], lp["experts_gate_up"], sizes, _GROUPED, precision=precision)
    hidden = act(gate_up[:, :i]) * gate_up[:, i:]
    down = lax.ragged_dot_general(hidden, lp["experts_down"], sizes, _GROUPED, precision=precision)
    down = down * weights.reshape(-1)[order][:, None].astype(down.dtype)
    out = jnp.zeros((t, h), down.dtype).at[token].add(down)
    if spec.shared_intermediate_size:
        s = spec.shared_intermediate_size
        gu = linear(x, lp["shared_gate_up"], precision, lp.get("shared_gate_up_scale"))
        shared = linear(act(gu[:, :s]) * gu[:, s:], lp["shared_down"], precision, lp.get("shared_down_scale"))
        gate = lax.dot_general(x, lp["shared_gate"], (((1,), (1,)), ((), ())), precision=precision)
        out = out + jax.nn.sigmoid(gate) * shared
    return out

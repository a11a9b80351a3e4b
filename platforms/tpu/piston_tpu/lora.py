"""Multi-LoRA for the JAX Llama family: adapter slots stacked in the parameters.

With ``EngineConfig.lora_config`` the parameters gain, for each of the model's fused linear
weights (``qkv``, ``o``, ``gate_up``, ``down``), the matrices of ``max_loras`` device slots
of rank ``R = max_lora_rank``, stacked by layer like the other layer parameters (so the
decoder's ``lax.scan`` slices them):

- ``lora_a_<group>`` [layers, slots, in, G * R]: the A^T of each of the group's G modules
  (q, k, v; o; gate, up; down) side by side, module j in columns j*R .. j*R + r;
- ``lora_b_<module>`` [layers, slots, R, out]: each module's B^T (its scaling folded in)
  in rows 0 .. r.

Ranks below R are zero-padded, and a module an adapter leaves out is zeros. Each token of a
step carries its slot (an int32 program input of the token bucket); a token without an
adapter, and every padding token, carries ``slots`` itself, one past the last slot, whose
one-hot row is all zeros. A layer adds, after its bias as the torch models do,

    delta = ((x @ A[all slots]) * one_hot(slot)) @ B[all slots]

two static matmuls over every slot at once (the shrink to [T, slots, G*R], masked to the
token's own slot, then the expand contracting slots and rank), with no gather of per-token
matrices and no loop over adapters or rows: the extra work per token is about
``slots * R * (in + out)`` multiply-adds per module. The matmuls run in the model's dtype
(float32 at HIGHEST precision for a float32 model).

``write_slot`` (one compiled program, donating the old stacks) replaces one slot of every
stack; the runner compiles it in warm-up, so loading an adapter compiles nothing.

Tensor parallelism: the TPU platform runs one chip per engine, so the stacks are not sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from piston.step.lora_adapter import LoRAAdapter

# (fused parameter, the Hugging Face modules it holds, in output order).
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
          ("down", ("down_proj",)))
PARAM_NAMES = tuple(f"lora_a_{g}" for g, _ in GROUPS) + tuple(f"lora_b_{m}" for _, ms in GROUPS for m in ms)


def is_lora_param(name: str) -> bool:
    return name.startswith("lora_")


def module_features(spec) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adapted module of a ``LlamaSpec``."""
    d, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def param_shapes(spec, max_loras: int, rank: int) -> dict[str, tuple[int, ...]]:
    feats, L = module_features(spec), spec.num_layers
    shapes = {}
    for group, modules in GROUPS:
        shapes[f"lora_a_{group}"] = (L, max_loras, feats[modules[0]][0], len(modules) * rank)
        for m in modules:
            shapes[f"lora_b_{m}"] = (L, max_loras, rank, feats[m][1])
    return shapes


def zero_params(spec, max_loras: int, rank: int, dtype) -> dict[str, jax.Array]:
    """Empty stacks, put on the device from the host (``jnp.zeros`` would compile a program,
    an error after warm-up, when a wake-up reloads the weights)."""
    return {n: jnp.asarray(np.zeros(shape, dtype)) for n, shape in param_shapes(spec, max_loras, rank).items()}


def slot_values(spec, adapter: LoRAAdapter | None, rank: int, dtype) -> dict[str, np.ndarray]:
    """One slot of every stack ([layers, ...]: the stack's shape without its slot axis) for
    ``adapter``, zero-padded to ``rank``; zeros for None."""
    shapes = param_shapes(spec, 1, rank)
    out = {n: np.zeros(shape[:1] + shape[2:], np.float32) for n, shape in shapes.items()}
    if adapter is not None:
        for group, modules in GROUPS:
            a_stack = out[f"lora_a_{group}"]
            for j, module in enumerate(modules):
                b_stack = out[f"lora_b_{module}"]
                for layer in range(spec.num_layers):
                    pair = adapter.weights.get((layer, module))
                    if pair is None:
                        continue
                    a, b = pair  # [r, in], [out, r]
                    r = a.shape[0]
                    if r > rank:
                        raise ValueError(f"LoRA adapter {adapter.request.lora_name!r}: rank {r} exceeds "
                                         f"max_lora_rank {rank}.")
                    a_stack[layer, :, j * rank:j * rank + r] = a.T
                    b_stack[layer, :r, :] = b.T
    return {n: v.astype(dtype) for n, v in out.items()}


def write_slot(stacks: dict[str, jax.Array], slot: jax.Array, values: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``stacks`` with slot ``slot`` (an int32 scalar) of each replaced by ``values``."""
    return {n: jax.lax.dynamic_update_index_in_dim(a, values[n].astype(a.dtype), slot, axis=1)
            for n, a in stacks.items()}


def token_one_hot(token_slots: jax.Array, num_slots: int, dtype) -> jax.Array:
    """[T, slots]: each token's slot as a one-hot row (all zeros for ``num_slots``: none)."""
    return jax.nn.one_hot(token_slots, num_slots, dtype=dtype)


def delta(x: jax.Array, a: jax.Array, bs: list[jax.Array], one_hot: jax.Array, precision) -> jax.Array:
    """The LoRA delta of one fused layer for tokens x [T, in]: ``a`` [slots, in, G*R] (this
    layer's slice of the group's A stack), ``bs`` the G modules' [slots, R, out_j]; returns
    [T, sum of out_j], the modules' deltas side by side (the fused weight's output order)."""
    rank = bs[0].shape[1]
    u = jnp.einsum("ti,sir->tsr", x, a.astype(x.dtype), precision=precision)
    u = u * one_hot[:, :, None]
    parts = [jnp.einsum("tsr,sro->to", u[:, :, j * rank:(j + 1) * rank], b.astype(x.dtype), precision=precision)
             for j, b in enumerate(bs)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

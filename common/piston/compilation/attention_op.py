"""``piston::attention``: attention as an opaque custom op, so the compiler splits there.

The op takes the layer's q/k/v and an output buffer and carries only the layer's index;
the layer object, its KV cache and the step's metadata come from the forward context the
runner sets. The compiler sees a function of tensor shapes only (the fake implementation),
so the traced graph never depends on metadata, and attention runs eagerly with any shape
or CPU-side logic the platform needs.
"""

from __future__ import annotations

import torch

from piston.attention.forward_context import get_forward_context

OP_NAME = "piston::attention"


def run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor,
                  layer_idx: int) -> None:
    """Attend for layer ``layer_idx`` and write ``[num_tokens, heads * head_dim]`` into ``output``.

    Rows past the step's real tokens (padding to a capture size) are set to zero. This is
    the op's body; the split model calls it directly (``bypass_dispatcher``), since going
    through torch's dispatcher costs about 15 us of host time per call, per layer and step.
    """
    ctx = get_forward_context()
    if ctx is None:
        raise RuntimeError("piston::attention ran outside a forward context; the model runner must call "
                           "the compiled model inside set_forward_context(...).")
    layer = ctx.attn_layers.get(layer_idx)
    if layer is None:
        raise RuntimeError(f"Attention layer {layer_idx} is not in the forward context's attn_layers; build "
                           "the ForwardContext with attn_layers=attention_layers(model).")
    if ctx.attn_metadata is None:
        result = layer.forward_no_cache(q, k, v)
    else:
        result = ctx.attn_impl.forward(layer, q, k, v, ctx.kv_caches[layer_idx], ctx.layer_metadata(layer_idx),
                                       output=output)
    n = result.shape[0]
    if result.data_ptr() != output.data_ptr():  # the backend did not write into output itself
        output[:n].copy_(result)
    if n < output.shape[0]:
        output[n:].zero_()


@torch.library.custom_op(OP_NAME, mutates_args=("output",))
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor,
              layer_idx: int) -> None:
    """``run_attention`` as the opaque op the compiler sees."""
    run_attention(q, k, v, output, layer_idx)


@attention.register_fake
def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor,
                    layer_idx: int) -> None:
    return None


def bypass_dispatcher(gm: torch.fx.GraphModule) -> int:
    """Point ``gm``'s calls of the op at ``run_attention`` itself (after compilation, when
    nothing traces the graph any more); returns how many calls it changed."""
    changed = 0
    for node in gm.graph.nodes:
        if is_attention_node(node):
            node.target = run_attention
            changed += 1
    if changed:
        gm.recompile()
    return changed


def is_attention_node(node: torch.fx.Node) -> bool:
    """True for a traced call of ``piston::attention`` (the graph is split there)."""
    return node.op == "call_function" and node.target in (torch.ops.piston.attention.default,
                                                          torch.ops.piston.attention, attention, run_attention)

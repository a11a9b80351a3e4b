"""All decoder layers of a Llama-family model in one C++ call (csrc/decoder_stack.cpp).

Set as the model's ``layers_kernel`` slot (piston.models.llama.LlamaModel) when every
layer runs Piston's C++ kernels: float32 or packed linears with their kernel slots set,
no LoRA, no tensor parallelism, a SiLU MLP, the plain RMSNorm (Qwen3's q/k norms too) and
RoPE kernels. The stack calls the same kernels in the same order as the modules, so its
results are the module path's bit for bit; what it removes is the Python between them,
and the slowdown it caused the kernels (SmolLM2 Q4_1 batch-1 decode: 13.9-15.4 -> 10.5-10.8
ms a token, benchmarks/RESULTS.md).

A step goes through the stack when the C++ attention kernel takes all its rows (no long
prompt for torch's flash attention, no hybrid KV cache) and it has at most
MAX_STACK_ROWS tokens; other steps run the layers one by one. PISTON_CPU_DECODER_STACK=0
turns it off.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from piston.attention.forward_context import get_forward_context
from piston.models.layers.layernorm import RMSNorm
from piston.models.layers.linear import ParallelLinearBase
from piston.models.layers.rotary_embedding import RotaryEmbedding
from piston.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel
from torch import nn

from piston_cpu import layer_kernels

logger = logging.getLogger(__name__.replace("piston_cpu", "piston.cpu", 1))

# Past this many tokens a step's kernels take long enough that the Python between them
# (about 3 ms for SmolLM2's 30 layers) is noise.
MAX_STACK_ROWS = 256


def enabled() -> bool:
    setting = os.environ.get("PISTON_CPU_DECODER_STACK", "1").lower()
    if setting not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"PISTON_CPU_DECODER_STACK={setting!r}: use 0 or 1.")
    return setting in ("1", "true", "on")


def _linear_args(module: ParallelLinearBase) -> tuple | None:
    """The stack's description of a linear layer, or None when it cannot run it."""
    if module.lora is not None or module.tp_size != 1:
        return None
    if module.qweight is not None:
        if module.qkernel is None:
            return None
        packed = module.qweight
        return None, list(packed.segments), list(packed.codes), module.bias, 0, None, 0
    if module.kernel is None:
        return None
    # The packed copy (packed_weights.py) rides on the kernel the layer's slot holds.
    slot = getattr(module.kernel, "packed_slot", None)
    copy = None if slot is None else slot.current(module.weight)
    return (module.weight, [], [], module.bias, layer_kernels.kernel_rows(module.in_local), copy,
            0 if copy is None else layer_kernels.MAX_PACKED_GEMM_ROWS)


def _why_not(layer: nn.Module) -> str | None:
    """Why the stack cannot run this layer (None: it can)."""
    if type(layer) is not LlamaDecoderLayer or type(layer.self_attn) is not LlamaAttention \
            or type(layer.mlp) is not LlamaMLP:
        return f"{type(layer).__name__} is not a plain Llama decoder layer"
    attn, mlp = layer.self_attn, layer.mlp
    if attn.q_norm is not None:
        for norm in (attn.q_norm, attn.k_norm):
            if type(norm) is not RMSNorm or norm.kernel is None:
                return f"the q/k norm {type(norm).__name__}"
        if attn.q_norm.eps != attn.k_norm.eps:
            return "q and k norms with different eps"
    if mlp.act_and_mul_kernel is None:
        return f"the MLP's activation {mlp.act_name}"
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if type(norm) is not RMSNorm or norm.kernel is None:
            return f"the norm {type(norm).__name__}"
    if type(attn.rotary_emb) is not RotaryEmbedding or attn.rotary_emb.kernel is None:
        return f"the rotary embedding {type(attn.rotary_emb).__name__}"
    for name, linear in zip(LINEARS, _linears(layer)):
        if _linear_args(linear) is None:
            return f"{name} (LoRA, tensor parallelism, or no kernel)"
    return None


LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _linears(layer: LlamaDecoderLayer) -> tuple[ParallelLinearBase, ...]:
    """The layer's linears in the order of LINEARS."""
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


class StackKernel:
    """The ``layers_kernel`` slot's function: the stack on the steps it takes (``steps``
    counts them), None on the others."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.steps = 0

    def __call__(self, positions: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        ctx = get_forward_context()
        if ctx is None or ctx.layer_group is not None or torch.compiler.is_compiling():
            return None
        md = ctx.attn_metadata
        rows = getattr(md, "kernel_rows", None)
        if (rows is None or rows.long_prompts or h.dim() != 2 or h.shape[0] > MAX_STACK_ROWS
                or md.num_actual_tokens != h.shape[0] or h.dtype != torch.float32):
            return None
        h, residual = self.stack.forward(h, positions, ctx.kv_caches, md.slot_mapping, rows.block_table,
                                         rows.seq_idx, rows.ctx_lens)
        self.steps += 1
        return h, residual


def build(ops: ModuleType, model: LlamaModel) -> StackKernel | None:
    """The model's layers as a ``layers_kernel`` for ``model`` (a LlamaModel whose layer
    kernels layer_kernels.install has set), or None, logged, when a layer does not fit."""
    for i, layer in enumerate(model.layers):
        reason = _why_not(layer)
        if reason is not None:
            logger.info("CPU kernels: the decoder layers run one by one (layer %d: %s).", i, reason)
            return None
    stack = ops.DecoderStack(layer_kernels.int8_activations())
    for layer in model.layers:
        attn, rope = layer.self_attn, layer.self_attn.rotary_emb
        stack.add_layer(attn.attn.layer_idx, layer.input_layernorm.weight, layer.input_layernorm.eps,
                        layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps,
                        *map(_linear_args, _linears(layer)), rope.cos_sin_cache, rope.rotary_dim, attn.num_heads,
                        attn.num_kv_heads, attn.head_dim, attn.attn.scale, attn.attn.sliding_window or 0,
                        *((attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.q_norm is not None
                          else (None, None, 0.0)))
    return StackKernel(stack)


def install(ops: ModuleType, model: nn.Module) -> StackKernel | None:
    """Sets ``layers_kernel`` on the model's LlamaModel when the stack can run its layers;
    returns it (None: not set)."""
    inner = model._modules.get("model")  # a submodule: the transformers fallback's property raises
    if not enabled() or not isinstance(inner, LlamaModel) or not hasattr(ops, "DecoderStack"):
        return None
    kernel = build(ops, inner)
    if kernel is not None:
        inner.layers_kernel = kernel
    return kernel

"""The Llama family: Llama 2/3, Mistral, Qwen2, Qwen3 and SmolLM2, in plain torch.

Sliding-window layers (Mistral's ``sliding_window``, Qwen2/3's ``use_sliding_window``) get
their window from piston.step.layer_types.

All of a step's tokens arrive flattened, ``[num_tokens]``, with no batch dimension; the
Attention layer (and the platform behind it) knows which tokens belong to which sequence.
q/k/v and gate/up are fused into one Linear each; ``load_weights`` fills them from the
Hugging Face checkpoint names.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from piston.attention.layer import Attention
from piston.models.layers.layernorm import RMSNorm
from piston.models.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLinearBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from piston.models.layers.rotary_embedding import RotaryEmbedding, get_rope
from piston.models.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
    compute_parallel_logits,
)
from piston.models.weight_loader import materialize
from piston.step.config import hf_head_dim, hf_num_kv_heads
from piston.step.layer_types import sliding_windows

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class LlamaMLP(nn.Module):
    # A platform may set a fused ``act_and_mul_kernel(gate_up) -> act(gate) * up`` on a
    # loaded model whose activation it implements (``act_name``); None runs torch's ops.
    act_and_mul_kernel: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config: Any, bias: bool) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}.")
        self.act_name = act
        self.act = _ACTIVATIONS[act]
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act_and_mul_kernel is not None:
            return self.down_proj(self.act_and_mul_kernel(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = hf_num_kv_heads(config)
        self.head_dim = hf_head_dim(config)
        # Split by heads over the tensor-parallel ranks (this rank's share below).
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads,
                                          bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        heads = self.qkv_proj.heads
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=o_bias,
                                        partition=(heads.q_start * self.head_dim, self.q_size))
        # Qwen3 normalizes each head of q and k before the rotary embedding.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              self.head_dim ** -0.5, layer_idx, sliding_windows(config)[layer_idx])

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            t = x.shape[0]
            q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim)).reshape(t, self.q_size)
            k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)).reshape(t, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v.contiguous()))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, qkv_bias, o_bias, qk_norm)
        self.mlp = LlamaMLP(config, bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin cache shared by every layer.
        rotary_emb = get_rope(config, hf_head_dim(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, qkv_bias, o_bias, qk_norm)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # An EAGLE-3 head reads the inputs of these layers (h + residual): each forward keeps
    # them, concatenated, in ``aux_hidden_states`` [T, 3 * hidden] (eager runs only).
    aux_layers: tuple[int, ...] = ()
    # A platform may set ``layers_kernel(positions, h) -> (h, residual) | None`` on a loaded
    # model: all of ``layers`` in one call on the steps it takes (None: this step runs the
    # layers one by one). It must compute what the layers do.
    layers_kernel: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        if self.layers_kernel is not None and not self.aux_layers:
            out = self.layers_kernel(positions, h)
            if out is not None:
                h, _ = self.norm(*out)
                return h
        aux = {}
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                aux[i] = h if residual is None else h + residual
            h, residual = layer(positions, h, residual)
        if aux:
            self.aux_hidden_states = torch.cat([aux[i] for i in self.aux_layers], dim=-1)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    """A Llama-architecture causal LM over a step's flattened tokens.

    ``forward(input_ids [T], positions [T]) -> hidden_states [T, hidden]``;
    ``compute_logits(hidden [N, hidden]) -> [N, vocab]`` in float32.
    """

    qkv_bias: bool | None = None  # None: config.attention_bias
    o_bias: bool | None = None  # None: config.attention_bias
    qk_norm = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = attention_bias if self.o_bias is None else self.o_bias
        self.model = LlamaModel(config, qkv_bias, o_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Tied models read the embedding matrix at logits time: nothing to keep in sync.
        self.lm_head = None if self.tie_word_embeddings else ParallelLMHead(
            config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return compute_parallel_logits(hidden_states, self._head(), self.config.vocab_size)

    def logits_head(self) -> VocabParallelEmbedding | None:
        """The layer whose product with the hidden states is the logits (the LM head or the
        tied embedding), or None where ``compute_logits`` does more than that product (a
        subclass's softcap or scale)."""
        if type(self).compute_logits is not LlamaForCausalLM.compute_logits:
            return None
        return self._head()

    def _head(self) -> VocabParallelEmbedding:
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """``compute_logits(hidden_states).argmax(-1)`` where the platform set a kernel on
        the head that finds it without all the logits; None otherwise."""
        head = self.logits_head()
        kernel = None if head is None or head.tp_size > 1 else head.greedy_kernel
        return None if kernel is None else kernel(hidden_states)

    # HF sub-module name -> (fused module name, shard id).
    _SHARDS = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def _target(self, name: str) -> tuple[str, Any]:
        """(this model's parameter name, shard id) of Hugging Face tensor ``name``."""
        parts = name.split(".")
        shard = self._SHARDS.get(parts[-2]) if len(parts) >= 2 else None
        if shard is not None:
            parts[-2] = shard[0]
        return ".".join(parts), (shard[1] if shard is not None else None)

    def use_packed_weights(self, packed_names: Iterable[str], int8: bool = False) -> int:
        """Before the model's memory is allocated: the layers that checkpoint tensors
        ``packed_names`` fill hold their weight packed, as do, with ``int8``, all linear
        layers but those marked ``keep_float`` (an MoE router), quantizing their float
        weights at load. Returns how many layers."""
        modules = dict(self.named_modules())
        chosen: dict[str, str | None] = {}
        for name in packed_names:
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            module_name, _, param_name = self._target(name)[0].rpartition(".")
            if param_name == "weight" and hasattr(modules.get(module_name), "use_packed_weight"):
                chosen[module_name] = None
        if int8:
            chosen.update({n: "int8" for n, m in modules.items()
                           if isinstance(m, ParallelLinearBase) and not getattr(m, "keep_float", False)})
        for module_name, quantize in chosen.items():
            modules[module_name].use_packed_weight(quantize)
        return len(chosen)

    def load_weights(self, weights: Iterable[tuple[str, Any]], partial: bool = False) -> int:
        """Copy Hugging Face-named tensors into this model's (fused, sharded) parameters;
        returns how many tensors were copied.

        ``weights`` yields tensors, lazy safetensors slices or packed arrays; a
        tensor-parallel layer reads only its rank's part, and a layer with a packed weight
        keeps it packed. Raises ValueError naming any parameter the checkpoint left
        unfilled, or any tensor whose shape does not match. Unknown names are logged and
        skipped. With ``partial`` (a weight update), the tensors may be any subset, and an
        unknown name is an error rather than a warning.
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        # Packed weights are no parameters, but checkpoint tensors fill them the same way.
        targets = dict.fromkeys([*params, *(f"{n}.weight" for n, m in modules.items()
                                             if getattr(m, "qweight", None) is not None)])
        filled: dict[str, set] = {}  # param -> shard ids written
        unexpected = []
        if partial:  # every name is checked before any tensor is copied
            weights = list(weights)
            unknown = [n for n, _ in weights if self._target(n)[0] not in targets
                       and not (n == "lm_head.weight" and self.lm_head is None)]
            if unknown:
                raise ValueError(f"{len(unknown)} weights have no place in this {type(self).__name__} "
                                 f"(e.g. {', '.join(unknown[:5])}); use the checkpoint's Hugging Face names.")
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, shard_id = self._target(name)
            if target not in targets:
                unexpected.append(name)
                continue
            module_name, _, param_name = target.rpartition(".")
            module = modules[module_name]
            if hasattr(module, "load"):
                module.load(param_name, tensor, shard_id)
            else:
                dst = params[target].data
                tensor = materialize(tensor)
                if dst.shape != tensor.shape:
                    raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, but the "
                                     f"model expects {tuple(dst.shape)}: the config does not match the weights.")
                dst.copy_(tensor)
            filled.setdefault(target, set()).add(shard_id)
        if unexpected:
            logger.warning("Skipped %d checkpoint tensors the model has no place for: %s",
                           len(unexpected), ", ".join(unexpected[:5]))
        if partial:
            return sum(len(ids) for ids in filled.values())
        missing = []
        for n in targets:
            module = modules[n.rpartition(".")[0]]
            expected = set(getattr(module, "shard_ids", (None,)))
            if not expected <= filled.get(n, set()):
                missing.append(n)
        if missing:
            raise ValueError(f"The checkpoint does not provide {len(missing)} of the model's parameters "
                             f"(e.g. {', '.join(missing[:5])}); is it a {type(self).__name__} checkpoint?")
        return sum(len(ids) for ids in filled.values())


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama whose layers attend within ``sliding_window`` tokens when it is set
    (piston.step.layer_types; the attention backends apply the window)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: bias on q/k/v, none on the output projection."""

    qkv_bias = True
    o_bias = False


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm on q and k before the rotary embedding."""

    qk_norm = True


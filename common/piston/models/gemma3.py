"""Gemma 3's text model (``Gemma3ForCausalLM``), in plain torch.

What sets it apart from the Llama family, each as transformers' Gemma3 code has it:
- local layers attend within ``sliding_window`` tokens, every n-th layer (``layer_types``)
  sees the whole context, and the two kinds rotate with their own RoPE bases;
- RMSNorm scales by ``1 + weight``, and every layer has four of them: before and after
  attention, before and after the MLP ("sandwich" norms); q and k are normalized per head;
- the embedding is scaled by sqrt(hidden_size); the MLP is GeGLU (tanh GELU);
- queries are scaled by ``query_pre_attn_scalar ** -0.5`` instead of head_dim's;
- final logits are soft-capped when ``final_logit_softcapping`` is set.

The step's tokens arrive flattened, ``[num_tokens]``, as in piston.models.llama, whose
weight loading (fused q/k/v and gate/up, packed GGUF weights, tensor parallelism) this
model shares.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from piston.attention.layer import Attention
from piston.models.layers.layernorm import RMSNorm
from piston.models.layers.linear import QKVParallelLinear, RowParallelLinear
from piston.models.layers.rotary_embedding import RotaryEmbedding, get_rope
from piston.models.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from piston.models.llama import LlamaForCausalLM, LlamaMLP
from piston.step.config import hf_head_dim, hf_num_kv_heads
from piston.step.layer_types import FULL, SLIDING, layer_types, rope_config, sliding_windows


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: ``x / sqrt(mean(x^2) + eps) * (1 + weight)``, all in float32 and cast
    back at the end (transformers' Gemma3RMSNorm). A platform's RMSNorm kernel, when set,
    gets ``1 + weight``: the same product, in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is not None and x.dtype == torch.float32:
            out, summed = self.kernel(x, residual, self.weight + 1.0, self.eps)
            return out if residual is None else (out, summed)
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (h * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)


class Gemma3Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, window: int | None) -> None:
        super().__init__()
        self.head_dim = hf_head_dim(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          hf_num_kv_heads(config), bias=bool(config.attention_bias))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        heads = self.qkv_proj.heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=bool(config.attention_bias),
                                        partition=(heads.q_start * self.head_dim, self.q_size))
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              float(config.query_pre_attn_scalar) ** -0.5, layer_idx, window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim)).reshape(t, self.q_size)
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)).reshape(t, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v.contiguous()))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, window: int | None) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(config, layer_idx, rotary_emb, window)
        # LlamaMLP reads ``hidden_act``; Gemma's config calls it ``hidden_activation``.
        self.mlp = LlamaMLP(SimpleNamespace(hidden_act=config.hidden_activation,
                                            intermediate_size=config.intermediate_size,
                                            hidden_size=config.hidden_size), bias=False)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # The stream entering the layer is h + residual (h alone for the first layer).
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.post_attention_layernorm(self.self_attn(positions, h))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        head_dim = hf_head_dim(config)
        types, windows = layer_types(config), sliding_windows(config)
        # One cos/sin cache per kind of layer, shared by the layers of that kind.
        ropes = {kind: get_rope(rope_config(config, kind), head_dim) for kind in sorted(set(types))}
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, ropes[types[i]], windows[i])
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = float(config.hidden_size) ** 0.5

    aux_layers: tuple[int, ...] = ()  # no EAGLE-3 heads for Gemma

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        # transformers rounds the scale to the weights' dtype before the product.
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's text model: ``forward(input_ids [T], positions [T]) -> hidden [T, hidden]``;
    ``compute_logits(hidden [N, hidden]) -> [N, vocab]`` float32, soft-capped as configured."""

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attn_logit_softcapping is set: attention-score soft-capping (Gemma 2) is not "
                             "implemented by Piston's attention backends.")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (Gemma 3 embedding models) is not supported: "
                             "Piston serves causal language models.")
        assert set(layer_types(config)) <= {FULL, SLIDING}
        self.config = config
        self.model = Gemma3Model(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = None if self.tie_word_embeddings else ParallelLMHead(config.vocab_size, config.hidden_size)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden_states)
        if self.final_logit_softcapping is not None:
            cap = float(self.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logits_head(self):
        """The head, where no softcap follows it (Gemma 3 has none; Gemma 2 had one)."""
        return self._head() if self.final_logit_softcapping is None else None

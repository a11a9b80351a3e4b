"""EAGLE-3 draft heads for the Llama family, in plain torch.

An EAGLE-3 head (Li et al., 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test") reads three of the target's layers rather than its
last one. Its first pass fuses them: ``fc`` maps the three residual streams (each taken at
the input of an "aux" layer, vLLM's convention: id ``j`` is the output of layer ``j - 1``)
to one feature. Its first decoder layer attends over the concatenation of the normalized
token embedding and the normalized feature (q/k/v read ``2h`` values), then runs the MLP;
``norm`` and its own LM head over a reduced draft vocabulary give the logits, mapped to the
target's ids by ``d2t`` (``target_id = draft_id + d2t[draft_id]``). Later passes feed the
head's own output before the final norm back as the feature, without ``fc``.

Checkpoints in the published layout (SafeAILab/EAGLE, lmsys, vLLM's
``Eagle3LlamaForCausalLM``): a Llama ``config.json`` with ``draft_vocab_size``, optionally
``target_hidden_size``, ``norm_before_residual`` and ``eagle_aux_hidden_state_layer_ids``
(top level or in ``eagle_config``), and safetensors with ``midlayer.*`` (or ``layers.0.*``)
including ``hidden_norm``, ``fc.weight``, ``norm.weight``, ``lm_head.weight``, ``d2t`` (``t2d``
is not needed) and optionally ``embed_tokens.weight`` (else the target's embedding).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from piston.models.layers.layernorm import RMSNorm
from piston.models.layers.linear import QKVParallelLinear
from piston.models.layers.rotary_embedding import get_rope
from piston.models.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from piston.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from piston.models.weight_loader import materialize
from piston.step.config import hf_head_dim, hf_num_kv_heads
from piston.step.eagle3_layers import aux_layer_ids


class Eagle3LlamaForCausalLM(LlamaForCausalLM):
    """``forward(input_ids [T], positions [T], features [T, 3 * target_hidden] or [T, h])
    -> outputs [T, h]`` (before the final norm: the next pass's features);
    ``compute_logits(outputs) -> [T, target vocabulary]`` (-inf outside the draft vocabulary)."""

    #: Whether the checkpoint has its own embedding (set by the loader before the model is built).
    own_embedding = False

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config
        h = config.hidden_size
        self.target_hidden = getattr(config, "target_hidden_size", None) or h
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))
        self.draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        bias = bool(getattr(config, "attention_bias", False))
        rotary_emb = get_rope(config, hf_head_dim(config))
        self.fc = nn.Linear(3 * self.target_hidden, h, bias=False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, bias, bias, False) for i in range(config.num_hidden_layers))
        first = self.layers[0].self_attn
        first.qkv_proj = QKVParallelLinear(2 * h, first.head_dim, config.num_attention_heads,
                                           hf_num_kv_heads(config), bias=bias)
        self.layers[0].hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(self.draft_vocab, h)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab, dtype=torch.int64))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h) if self.own_embedding else None
        self._target_model: list[nn.Module] = []

    def attach_target(self, target: nn.Module) -> None:
        self._target_model = [target]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        embed = self.embed_tokens if self.embed_tokens is not None else self._target_model[0].model.embed_tokens
        first = self.layers[0]
        embeds = first.input_layernorm(embed(input_ids))
        if features.shape[-1] == 3 * self.target_hidden:  # the first pass: the target's three layers
            features = self.fc(features.to(embeds.dtype))
        if self.norm_before_residual:
            h = first.hidden_norm(features)
            residual = h
        else:
            residual, h = features, first.hidden_norm(features)
        h = first.self_attn(positions, torch.cat([embeds, h], dim=-1))
        h, residual = first.post_attention_layernorm(h, residual)
        h = first.mlp(h)
        for layer in self.layers[1:]:
            h, residual = layer(positions, h, residual)
        return h + residual

    def compute_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        draft = self.lm_head(self.norm(outputs))
        logits = draft.new_full((draft.shape[0], self.config.vocab_size), float("-inf"))
        logits[:, torch.arange(self.draft_vocab, device=draft.device) + self.d2t] = draft
        return logits

    @staticmethod
    def _hf_name(name: str) -> str:
        name = name.removeprefix("model.")
        return "layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name

    def use_packed_weights(self, packed_names: Iterable[str], int8: bool = False) -> int:
        return super().use_packed_weights([self._hf_name(n) for n in packed_names], int8)

    def load_weights(self, weights: Iterable[tuple[str, Any]], partial: bool = False) -> int:
        found_d2t = []

        def own():
            for name, tensor in weights:
                name = self._hf_name(name)
                if name == "d2t":  # a buffer: the base class fills parameters only
                    self.d2t.copy_(torch.as_tensor(materialize(tensor)).to(torch.int64))
                    found_d2t.append(name)
                elif name != "t2d":
                    yield name, tensor

        count = super().load_weights(own(), partial)
        if not found_d2t and not partial:
            raise ValueError("The EAGLE-3 checkpoint has no d2t (draft-to-target vocabulary offsets).")
        return count + len(found_d2t)


def eagle3_class(checkpoint_names: Iterable[str]) -> type[Eagle3LlamaForCausalLM]:
    names = {Eagle3LlamaForCausalLM._hf_name(n) for n in checkpoint_names}
    if not {"fc.weight", "d2t", "layers.0.hidden_norm.weight"} <= names:
        raise ValueError("not an EAGLE-3 head: its checkpoint lacks fc.weight, d2t or the midlayer's hidden_norm.")
    return type("Eagle3LlamaForCausalLM", (Eagle3LlamaForCausalLM,),
                {"own_embedding": "embed_tokens.weight" in names})


def load_eagle3_head(model_config: Any, target: nn.Module, device: str | torch.device) -> Eagle3LlamaForCausalLM:
    """The EAGLE-3 head of ``model_config`` (its folder), with ``target`` set to hand it the
    inputs of its aux layers (``LlamaModel.aux_layers``)."""
    from piston.models.loader import load_model
    from piston.models.weight_loader import iterate_safetensors

    if model_config.load_format == "dummy":
        names = ["fc.weight", "d2t", "layers.0.hidden_norm.weight"]
    else:
        names = [n for n, _ in iterate_safetensors(model_config.path or model_config.model, lazy=True)]
    head = load_model(model_config, device=device, model_cls=eagle3_class(names))
    head.attach_target(target)
    target.model.aux_layers = aux_layer_ids(model_config.hf_config, len(target.model.layers))
    return head

"""EAGLE-1 draft heads for the Llama family, in plain torch.

An EAGLE head (Li et al., 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty") drafts from the target's features rather than from tokens alone. At position
``p`` it reads the target's last hidden state there (after the final norm, what the LM head
reads) and the embedding of the token at ``p + 1``, fuses them (``fc``: ``[2h] -> [h]``),
runs a few Llama decoder layers (the first without its input norm) and returns a feature
for position ``p + 1``, which the target's LM head turns into the token at ``p + 2``. The
head shares the target's embedding and LM head.

Checkpoints in the published layout (SafeAILab/EAGLE, vLLM's ``EagleLlamaForCausalLM``): a
folder with a Llama ``config.json`` (the head's layers) and safetensors holding
``fc.weight`` (and ``fc.bias`` where the head has one), ``layers.N.*`` in Hugging Face
names, and optionally ``embed_tokens.weight`` / ``lm_head.weight`` (ignored: the target's
are used). A ``model.`` prefix on every name is accepted too.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from piston.models.layers.rotary_embedding import get_rope
from piston.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from piston.step.config import hf_head_dim

_SHARED = ("embed_tokens.", "lm_head.", "norm.")  # the target's: never read from the head's checkpoint


class _NoNorm(nn.Module):
    """The first layer's input "norm": EAGLE feeds the fused features in as they are."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class EagleLlamaForCausalLM(LlamaForCausalLM):
    """``forward(input_ids [T], positions [T], hidden_states [T, h]) -> features [T, h]``
    (``input_ids[t]`` is the token after position ``positions[t]``); ``compute_logits``
    is the target's (``attach_target``)."""

    #: Whether the checkpoint has ``fc.bias`` (set by the loader before the model is built).
    fc_bias = False

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config
        h = config.hidden_size
        bias = bool(getattr(config, "attention_bias", False))
        rotary_emb = get_rope(config, hf_head_dim(config))
        self.fc = nn.Linear(2 * h, h, bias=self.fc_bias)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, bias, bias, False) for i in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = _NoNorm()
        self.lm_head = None
        self._target_model: list[nn.Module] = []  # in a list: not a submodule (its weights are the target's)

    def attach_target(self, target: nn.Module) -> None:
        """Share the target's embedding and LM head (after both are loaded)."""
        self._target_model = [target]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        embeds = self._target_model[0].model.embed_tokens(input_ids)
        h, residual = self.fc(torch.cat([embeds, hidden_states.to(embeds.dtype)], dim=-1)), None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return h + residual

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._target_model[0].compute_logits(hidden_states)

    def _target_name(self, name: str) -> str:
        return name[len("model."):] if name.startswith("model.") else name

    def use_packed_weights(self, packed_names: Iterable[str], int8: bool = False) -> int:
        return super().use_packed_weights([self._target_name(n) for n in packed_names], int8)

    def load_weights(self, weights: Iterable[tuple[str, Any]], partial: bool = False) -> int:
        own = ((self._target_name(n), t) for n, t in weights)
        return super().load_weights(((n, t) for n, t in own if not n.startswith(_SHARED)), partial)


def eagle_class(checkpoint_names: Iterable[str]) -> type[EagleLlamaForCausalLM]:
    """The head's class for a checkpoint with these tensor names (``fc.bias`` or not)."""
    names = {n[len("model."):] if n.startswith("model.") else n for n in checkpoint_names}
    if "fc.weight" not in names:
        raise ValueError("not an EAGLE head: its checkpoint has no fc.weight (the layer that fuses the "
                         "token's embedding with the target's feature).")
    return type("EagleLlamaForCausalLM", (EagleLlamaForCausalLM,), {"fc_bias": "fc.bias" in names})


def load_eagle_head(model_config: Any, target: nn.Module, device: str | torch.device) -> EagleLlamaForCausalLM:
    """The EAGLE head of ``model_config`` (its folder), sharing ``target``'s embedding and head."""
    from piston.models.loader import load_model
    from piston.models.weight_loader import iterate_safetensors

    if model_config.load_format == "dummy":
        names = ["fc.weight"]
    else:
        names = [n for n, _ in iterate_safetensors(model_config.path or model_config.model, lazy=True)]
    head = load_model(model_config, device=device, model_cls=eagle_class(names))
    head.attach_target(target)
    return head

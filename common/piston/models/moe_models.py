"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE, in plain torch.

Each is the Llama decoder (piston.models.llama: attention, norms, embeddings, logits,
weight loading) with a sparse MoE block in place of the MLP:

- a router (``gate``, [E, hidden], replicated on every rank) whose softmax picks the top
  k experts of each token, renormalized to sum to 1 (Mixtral always; Qwen by
  ``norm_topk_prob``);
- the experts (piston.models.layers.fused_moe.FusedMoE: grouped GEMMs over the tokens
  sorted by expert);
- Qwen2-MoE only: a shared expert every token goes through, scaled by
  ``sigmoid(shared_expert_gate(x))``.

With tensor parallelism the experts and the shared expert return this rank's partial
sums, and the block all-reduces their total once. Qwen's ``decoder_sparse_step`` and
``mlp_only_layers`` make some layers dense (a Llama MLP of ``intermediate_size``).
Sliding windows come with LlamaAttention (piston.step.layer_types).
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from piston.distributed.parallel_state import tp_all_reduce
from piston.models.layers.fused_moe import FUSED, FusedMoE
from piston.models.layers.layernorm import RMSNorm
from piston.models.layers.linear import ColumnParallelLinear, RowParallelLinear
from piston.models.layers.rotary_embedding import RotaryEmbedding, get_rope
from piston.models.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from piston.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from piston.step.config import hf_head_dim

# A checkpoint's per-expert tensor: (layer prefix up to ".experts", expert, projection).
logger = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_HALF = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}  # gate rows, then up rows


class ReplicatedLinear(ColumnParallelLinear):
    """The whole linear layer on every rank (a router: its few outputs are not split). Kept
    in float under --quantization int8, as vLLM keeps routers: int8 logits would move tokens
    between experts."""

    keep_float = True

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__(input_size, output_size, bias=False, partition=(0, output_size))


class PartialRowParallelLinear(RowParallelLinear):
    """A RowParallelLinear that returns this rank's partial product, unsummed: the MoE
    block adds it to the experts' part and all-reduces the total once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, None)


class SparseMoeBlock(nn.Module):
    """Router, routed experts and (Qwen2-MoE) a gated shared expert; see the module docstring."""

    def __init__(self, config: Any, num_experts: int, intermediate_size: int, renormalize: bool,
                 shared_intermediate_size: int = 0, name: str = "mlp") -> None:
        super().__init__()
        hidden = config.hidden_size
        self.gate = ReplicatedLinear(hidden, num_experts)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, hidden, intermediate_size, renormalize,
                                getattr(config, "hidden_act", "silu"), name=f"{name}.experts")
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            shape = SimpleNamespace(hidden_size=hidden, intermediate_size=shared_intermediate_size,
                                    hidden_act=getattr(config, "hidden_act", "silu"))
            self.shared_expert = LlamaMLP(shape, bias=False)
            self.shared_expert.down_proj = PartialRowParallelLinear(shared_intermediate_size, hidden)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return tp_all_reduce(out)


class MoeDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (its forward) with ``mlp`` given: a SparseMoeBlock or a dense MLP."""

    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, mlp: nn.Module) -> None:
        nn.Module.__init__(self)
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, qkv_bias, o_bias, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoeModel(LlamaModel):
    """Llama's decoder stack (its forward) over MoeDecoderLayers with the given MLPs."""

    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool, mlps: list[nn.Module]) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = get_rope(config, hf_head_dim(config))
        self.layers = nn.ModuleList(MoeDecoderLayer(config, i, rotary_emb, qkv_bias, o_bias, qk_norm, mlp)
                                    for i, mlp in enumerate(mlps))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-family causal LM whose MLPs are (mostly) sparse MoE blocks. Subclasses say
    which layers are sparse and how (``_mlp``) and which biases and norms the attention has."""

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config
        qkv_bias, o_bias = self._attention_biases(config)
        mlps = [self._mlp(config, i) for i in range(config.num_hidden_layers)]
        self.model = MoeModel(config, qkv_bias, o_bias, self.qk_norm, mlps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else ParallelLMHead(config.vocab_size, config.hidden_size)

    def _attention_biases(self, config: Any) -> tuple[bool, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def _mlp(self, config: Any, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def use_packed_weights(self, packed_names, int8: bool = False) -> int:
        count = super().use_packed_weights(packed_names, int8)
        if int8:
            logger.info("int8: the routers and the routed experts stay in float (no int8 grouped GEMM yet); "
                        "attention, dense MLPs and shared experts are int8.")
        return count

    def _target(self, name: str) -> tuple[str, Any]:
        """Also maps the expert tensors (per expert, or fused) to the FusedMoE weights."""
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoint name of the block
        match = _PER_EXPERT.match(name)
        if match:
            prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
            if proj in _HALF:
                return f"{prefix}.w13.weight", (expert, _HALF[proj])
            return f"{prefix}.w2.weight", expert
        if name.endswith(".experts.gate_up_proj"):
            return name[:-len("gate_up_proj")] + "w13.weight", FUSED
        if name.endswith(".experts.down_proj"):
            return name[:-len("down_proj")] + "w2.weight", FUSED
        return super()._target(name)


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: every layer sparse, ``num_local_experts`` experts of ``intermediate_size``,
    the top-k weights always renormalized."""

    def _mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(config, _num_experts(config), config.intermediate_size, renormalize=True,
                              name=f"model.layers.{layer_idx}.mlp")


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm); experts of
    ``moe_intermediate_size``; dense MLPs in ``mlp_only_layers`` and off the
    ``decoder_sparse_step``."""

    qk_norm = True

    def _mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if not _is_sparse(config, layer_idx):
            return LlamaMLP(config, bias=False)
        return SparseMoeBlock(config, _num_experts(config), config.moe_intermediate_size,
                              renormalize=bool(config.norm_topk_prob), name=f"model.layers.{layer_idx}.mlp")


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2-MoE: Qwen2's attention (q/k/v bias, per ``qkv_bias``); experts of
    ``moe_intermediate_size`` plus a shared expert of ``shared_expert_intermediate_size``
    behind a sigmoid gate; dense layers as Qwen3-MoE."""

    def _attention_biases(self, config: Any) -> tuple[bool, bool]:
        return bool(getattr(config, "qkv_bias", True)), False

    def _mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if not _is_sparse(config, layer_idx):
            return LlamaMLP(config, bias=False)
        return SparseMoeBlock(config, _num_experts(config), config.moe_intermediate_size,
                              renormalize=bool(config.norm_topk_prob),
                              shared_intermediate_size=config.shared_expert_intermediate_size,
                              name=f"model.layers.{layer_idx}.mlp")


def _is_sparse(config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule (as transformers): a layer is sparse unless listed in
    ``mlp_only_layers``, and only every ``decoder_sparse_step``-th layer is."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and _num_experts(config) > 0 and (layer_idx + 1) % step == 0)


def _num_experts(config: Any) -> int:
    """``num_experts``, which transformers' Mixtral and Qwen3-MoE configs serialize as
    ``num_local_experts`` (what the engine's processes read back)."""
    value = getattr(config, "num_experts", None)
    return int(config.num_local_experts if value is None else value)

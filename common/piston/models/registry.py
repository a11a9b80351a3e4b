"""Which Piston model class runs which Hugging Face ``architectures`` name."""

from __future__ import annotations

from typing import Any

from torch import nn

from piston.models.gemma3 import Gemma3ForCausalLM
from piston.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The model class for the first supported name in ``hf_config.architectures``.

    Raises ValueError listing the supported architectures when none is supported.
    """
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(f"Model architecture {names or '(none given)'} is not supported; "
                     f"supported: {', '.join(supported_architectures())}.")

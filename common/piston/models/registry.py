"""Which Piston model class runs which Hugging Face ``architectures`` name."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from piston.models.gemma3 import Gemma3ForCausalLM
from piston.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from piston.models.moe_models import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from piston.step.config import MODEL_IMPLS

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
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
                     f"supported: {', '.join(supported_architectures())}. Other decoder-only causal LMs can run "
                     "through transformers' modelling code: --model-impl transformers (or auto).")


logger = logging.getLogger(__name__)


def resolve_model_class(hf_config: Any, model_impl: str = "auto") -> type[nn.Module]:
    """The class that runs ``hf_config``'s architecture: Piston's own ("piston"), the
    transformers fallback ("transformers"), or Piston's own where it has one and the
    fallback otherwise ("auto", which logs its pick).

    Raises ValueError for an unknown ``model_impl``, and with "piston" for an architecture
    Piston does not implement (the fallback raises its own for one it cannot run).
    """
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl={model_impl!r} is unknown; use one of {', '.join(MODEL_IMPLS)}.")
    if model_impl != "transformers":
        try:
            cls = get_model_class(hf_config)
        except ValueError:
            if model_impl == "piston":
                raise
        else:
            if model_impl == "auto":
                logger.info("model_impl=auto: %s runs on Piston's own model.", cls.__name__)
            return cls
    from piston.models.transformers_fallback import TransformersForCausalLM

    names = list(getattr(hf_config, "architectures", None) or [])
    logger.info("model_impl=%s: running %s through the transformers fallback (transformers' modelling code, "
                "Piston's paged attention).", model_impl, names or getattr(hf_config, "model_type", "?"))
    return TransformersForCausalLM

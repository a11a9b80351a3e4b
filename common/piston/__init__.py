"""Piston: a fast, easy LLM inference and serving engine."""

from piston.logger import configure_logging
from piston.outputs import CompletionOutput, Logprob, RequestOutput
from piston.step.lora_request import LoRARequest
from piston.step.sampling_params import SamplingParams, StructuredOutputsParams
from piston.version import __version__

configure_logging()

__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
           "Logprob", "__version__"]


def __getattr__(name):
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from piston.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'piston' has no attribute {name!r}")

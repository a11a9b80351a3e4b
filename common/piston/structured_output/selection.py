"""Which grammar engine runs: the choice, building it, and checking a request's constraint
in the front end (each engine's module imports only the interface in ``backend``)."""

from __future__ import annotations

import importlib.util
from typing import Any

from piston.step.sampling_params import StructuredOutputsParams
from piston.structured_output.backend import GrammarBackend

BACKENDS = ("xgrammar", "guidance")
# The largest constraint (schema as JSON text, regex, choices, grammar) a request may give.
MAX_CONSTRAINT_CHARS = 256 * 1024


def choose_backend(name: str) -> str:
    """"auto": xgrammar when it imports here (it needs torch), else llguidance."""
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"structured outputs backend {name!r} is unknown; use auto, {', '.join(BACKENDS)}.")
    if name != "auto":
        return name
    return "xgrammar" if _importable("xgrammar") and _importable("torch") else "guidance"


def make_backend(name: str, tokenizer: Any, vocab_size: int) -> GrammarBackend:
    name = choose_backend(name)
    if name == "xgrammar":
        from piston.structured_output.xgrammar_backend import XgrammarBackend

        return XgrammarBackend(tokenizer, vocab_size)
    from piston.structured_output.guidance_backend import GuidanceBackend

    return GuidanceBackend(tokenizer, vocab_size)


def validate(params: StructuredOutputsParams, backend: str = "auto") -> None:
    """ValueError naming the problem when ``params`` cannot compile on ``backend`` (no
    tokenizer needed: the front end checks every request before the engine sees it)."""
    size = len(params.key[1])
    if size > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"structured_outputs.{params.kind} is {size} characters long; the limit is "
                         f"{MAX_CONSTRAINT_CHARS}.")
    name = choose_backend(backend)
    if name == "guidance":
        from piston.structured_output.guidance_backend import validate as check
    else:
        from piston.structured_output.xgrammar_backend import validate as check
    check(params)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None

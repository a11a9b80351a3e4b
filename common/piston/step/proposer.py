"""Proposers: who drafts the tokens speculative decoding checks.

A proposer is made once per model runner from the SpeculativeConfig and asked, after each
step, for the drafts of the requests that sampled:
``propose(batch: InputBatch, rows: np.ndarray) -> list[list[int]]``, up to
``num_speculative_tokens`` tokens per row (``batch.token_ids[row, :batch.num_tokens[row]]``
is everything the request holds, its new tokens included). Drafts only change the speed:
the rejection sampler keeps the target model's own tokens or distribution whatever they are.

``method``: "ngram" (piston.step.ngram_proposer), or "module:Class" of a custom proposer
constructed with the SpeculativeConfig (it runs in every worker process, so its module
must be importable there).
"""

from __future__ import annotations

import importlib
from typing import Any

from piston.step.config import SpeculativeConfig


def make_proposer(config: SpeculativeConfig) -> Any:
    if config.method == "ngram":
        from piston.step.ngram_proposer import NgramProposer

        return NgramProposer(config)
    return proposer_class(config.method)(config)


def proposer_class(method: str) -> type:
    """The class ``module:Class`` names; ValueError when it cannot be imported or has no
    ``propose``."""
    module, _, name = method.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"speculative_config.method={method!r}: cannot import it ({e}).") from e
    if not isinstance(cls, type) or not callable(getattr(cls, "propose", None)):
        raise ValueError(f"speculative_config.method={method!r}: expected a class with a propose method.")
    return cls

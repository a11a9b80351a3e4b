"""The grammar-engine interface.

A backend compiles a request's StructuredOutputsParams into a grammar for the model's
vocabulary (raising ValueError, naming the problem, when the schema, regex or grammar is
invalid) and makes a matcher per request. A matcher accepts tokens and fills one row of a
packed token bitmask: int32 words, bit j of word w set when token 32 * w + j is allowed.
"""

from __future__ import annotations

import abc
from typing import Any

from piston.step.sampling_params import StructuredOutputsParams

class GrammarMatcher(abc.ABC):
    @abc.abstractmethod
    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over ``token_ids``; False if the grammar rejects one (the matcher then stays
        after the tokens before it)."""

    @abc.abstractmethod
    def fill_bitmask(self, bitmask, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of the int32 ``bitmask``."""

    @abc.abstractmethod
    def can_stop(self) -> bool:
        """The text accepted so far is complete: the stop token may come next."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """A stop token has ended the grammar: nothing may follow. (A complete grammar
        first allows only the stop token, which the request samples and ends on.)"""


class GrammarBackend(abc.ABC):
    name = ""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @abc.abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (may take long; called off the busy loop). ValueError if invalid."""

    @abc.abstractmethod
    def matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask) -> None:
        """Row i of ``bitmask`` for ``matchers[i]`` (engines with a batched call override this)."""
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, row)


def gbnf_to_grammar_text(params: StructuredOutputsParams) -> str:
    """A choice as a grammar: each option a quoted literal (shared by both backends)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c) for c in params.choice)

"""llguidance as the grammar engine: Rust, no dependencies, numpy bitmasks (torch-free)."""

from __future__ import annotations

import json
from typing import Any

from piston.step.sampling_params import StructuredOutputsParams
from piston.structured_output.backend import GrammarBackend, GrammarMatcher

# JSON laid out as xgrammar's any_whitespace=False lays it out, so that both engines allow
# the same tokens: no free whitespace, ", " between items and ": " after keys.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def guidance_grammar(params: StructuredOutputsParams) -> str:
    """The request's constraint as an llguidance grammar definition (not validated yet)."""
    from llguidance import LLMatcher, grammar_from

    kind = params.kind
    if kind in ("json", "json_object"):
        schema = params.json if kind == "json" else {"type": "object"}
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return grammar_from("choice", json.dumps(params.choice))
    try:  # EBNF (GBNF) or Lark
        return grammar_from("grammar", params.grammar)
    except ValueError as e:
        raise ValueError(f"structured_outputs.grammar: {e}") from e


def validate(params: StructuredOutputsParams) -> None:
    """ValueError naming the problem when the constraint cannot compile (no tokenizer needed)."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(guidance_grammar(params))
    if error:
        raise ValueError(f"structured_outputs.{params.kind} is invalid: {error}")


class GuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher, stop_token_id: int) -> None:
        self._matcher = matcher
        self._stop_token_id = stop_token_id
        self._ended = False

    def accept_tokens(self, token_ids: list[int]) -> bool:
        for token in token_ids:
            if self._ended:
                return False  # nothing may follow the stop token
            self._ended = token == self._stop_token_id
            # A complete grammar has stopped already; its stop token is then no token to consume.
            if self._ended and self._matcher.is_stopped():
                continue
            if self._matcher.try_consume_tokens([token]) != 1:  # (consume_token would leave an error state)
                self._ended = False
                return False
        return True

    def can_stop(self) -> bool:
        return self._matcher.is_accepting()

    def fill_bitmask(self, bitmask, row: int) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        # llguidance stops as soon as only the stop token may follow; that token still has
        # to be sampled (as with xgrammar), so the request ends on it.
        return self._ended


class GuidanceBackend(GrammarBackend):
    """Rows are filled one by one on the engine thread (the base class's loop): llguidance's
    parallel fill measured no faster here (64 rows of a JSON schema, 6.3 ms both ways on 2
    cores), and its worker threads would compete with the model's."""

    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        from llguidance import LLTokenizer

        backend = tokenizer.backend_tokenizer
        self._tokenizer = LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_token_id)

    def compile(self, params: StructuredOutputsParams) -> Any:
        from llguidance import LLMatcher

        grammar = guidance_grammar(params)
        error = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ValueError(f"structured_outputs.{params.kind} is invalid: {error}")
        return grammar

    def matcher(self, compiled: Any) -> GrammarMatcher:
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
        return GuidanceMatcher(matcher, self.tokenizer.eos_token_id)

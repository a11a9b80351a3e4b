"""xgrammar as the grammar engine (its import needs torch: CPU and CUDA platforms)."""

from __future__ import annotations

import json
from typing import Any

from piston.step.sampling_params import StructuredOutputsParams
from piston.structured_output.backend import GrammarBackend, GrammarMatcher, gbnf_to_grammar_text


def validate(params: StructuredOutputsParams) -> None:
    """ValueError naming the problem when the constraint does not parse as a grammar."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(json.dumps(params.json), any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(params.regex)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(params.grammar)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"structured_outputs.{kind} is invalid: {e}") from e


class XgrammarMatcher(GrammarMatcher):
    def __init__(self, matcher) -> None:
        self._matcher = matcher

    def accept_tokens(self, token_ids: list[int]) -> bool:
        return all(self._matcher.accept_token(t) for t in token_ids)

    def fill_bitmask(self, bitmask, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def can_stop(self) -> bool:
        return self._matcher.is_completed()

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XgrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        import xgrammar as xgr

        backend = tokenizer.backend_tokenizer
        vocab = [""] * vocab_size
        for token, index in backend.get_vocab(with_added_tokens=True).items():
            if index < vocab_size:
                vocab[index] = token
        # Special tokens are control, not text: an empty entry keeps xgrammar from allowing
        # them inside strings (llguidance never allows them either).
        for index, added in backend.get_added_tokens_decoder().items():
            if added.special and index < vocab_size:
                vocab[index] = ""
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        info = xgr.TokenizerInfo(vocab, vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                                 stop_token_ids=[tokenizer.eos_token_id],
                                 add_prefix_space=metadata["add_prefix_space"])
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, params: StructuredOutputsParams) -> Any:
        compiler = self._compiler
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                schema = params.json if kind == "json" else {"type": "object"}
                return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(gbnf_to_grammar_text(params))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"structured_outputs.{kind} is invalid: {e}") from e

    def matcher(self, compiled: Any) -> GrammarMatcher:
        import xgrammar as xgr

        return XgrammarMatcher(xgr.GrammarMatcher(compiled))

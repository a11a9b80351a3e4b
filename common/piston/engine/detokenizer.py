"""IncrementalDetokenizer: token ids to text, one step at a time, with stop strings.

With a fast (Rust) tokenizer, each token goes through the tokenizers library's own
``DecodeStream``, which holds the few ids of an unfinished character and returns the text
a token completes: one call into Rust per token. Otherwise each update decodes a short
window of recent ids twice: the window's settled prefix [prefix_offset, read_offset) and
the whole window [prefix_offset, end). The new text is what the second adds to the first.
While the window ends in an unfinished UTF-8 character (decode shows U+FFFD) nothing is
emitted and the window grows; once the character completes the offsets move up to the
end. Either way an update costs O(window), not O(sequence length).
"""

from __future__ import annotations

from piston.step.sampling_params import SamplingParams

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

# Prompt tokens decoded as context, so the first output token gets the leading
# space (or merge) it would have after the prompt.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"
# Settled ids are dropped from the window list once this many pile up.
_TRIM_AT = 256


def decode_token(tokenizer, token_id: int) -> str:
    """The text of one token on its own, special tokens included (for logprobs).

    A token holding part of a multi-byte character decodes to U+FFFD.
    """
    return tokenizer.decode(
        [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def find_stop_string(
    text: str, new_chars: int, stop: list[str], include_in_output: bool
) -> tuple[str, int] | None:
    """The earliest stop string that ends in the last ``new_chars`` characters of text.

    Returns (stop string, length to truncate text to), or None. The length keeps
    the stop string when include_in_output, and is -1 when nothing need be cut.
    """
    best: tuple[str, int] | None = None
    for stop_str in stop:
        # A match must end inside the new text, so it starts at most len-1 earlier.
        start = max(len(text) - new_chars - len(stop_str) + 1, 0)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop_str, index)
    if best is None:
        return None
    stop_str, index = best
    if include_in_output:
        index += len(stop_str)
        if index >= len(text):
            index = -1
    return stop_str, index


class IncrementalDetokenizer:
    """Text of one output sequence (one request, or one choice when n > 1).

    Semantics follow vLLM V1:
    - Text is decoded without clean_up_tokenization_spaces; special tokens are
      dropped when ``params.skip_special_tokens``.
    - When the engine stops on a stop token (eos or ``stop_token_ids``), that
      token's text is left out of ``output_text`` unless
      ``params.include_stop_str_in_output``; its id is still in ``token_ids``.
    - Stop strings are searched only once more than ``params.min_tokens`` tokens
      exist, and only in text produced after the first ``min_tokens`` tokens.
      On a match ``output_text`` is cut before the stop string (or after it with
      ``include_stop_str_in_output``).
    - A byte sequence that never completes a character is never emitted.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.output_text = ""
        # Context ids followed by every output id; the offsets index into it.
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if DecodeStream is not None else None
        self._stream = None
        if self._backend is not None:
            self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
            for token_id in self._ids:  # the prompt's end: context for the first output token
                self._stream.step(self._backend, token_id)
        self._stop = params.stop or []
        # Streaming holds back a possible stop-string prefix, unless it is kept anyway.
        if self._stop and not params.include_stop_str_in_output:
            self._hold_back = max(len(s) for s in self._stop) - 1
        else:
            self._hold_back = 0
        self._sent = 0

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Append this step's tokens and decode them.

        Returns the stop string that matched (``output_text`` is then truncated;
        the caller finishes the request), else None.
        """
        if not new_token_ids:
            return None
        skipped = None
        if stop_terminated and not self.params.include_stop_str_in_output:
            *new_token_ids, skipped = new_token_ids
        min_tokens = self.params.min_tokens
        check_from = len(self.output_text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self.output_text += self._decode_next(token_id)
            # Text of the first min_tokens tokens may not hold a stop string.
            if len(self.token_ids) <= min_tokens:
                check_from = len(self.output_text)
        if skipped is not None:
            self.token_ids.append(skipped)
        if not self._stop or len(self.token_ids) <= min_tokens:
            return None
        match = find_stop_string(
            self.output_text,
            len(self.output_text) - check_from,
            self._stop,
            self.params.include_stop_str_in_output,
        )
        if match is None:
            return None
        stop_str, truncate_to = match
        if truncate_to != -1:
            self.output_text = self.output_text[:truncate_to]
        return stop_str

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream now: new since the last call (delta) or all of it.

        Until finished, the last (longest stop string - 1) characters are held
        back so a partial stop string is never sent; finishing releases them.
        """
        hold = 0 if finished else self._hold_back
        end = max(len(self.output_text) - hold, 0)
        if not delta:
            return self.output_text[:end]
        if end <= self._sent:
            return ""
        text = self.output_text[self._sent : end]
        self._sent = end
        return text

    def _decode_next(self, token_id: int) -> str:
        """The text ``token_id`` completes, or "" while a character is unfinished."""
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        skip = self.params.skip_special_tokens
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset], skip)
        window_text = self._decode(self._ids[self._prefix_offset :], skip)
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

"""StructuredOutputManager: the grammars of the EngineCore's constrained requests.

- ``submit(request)`` starts compiling the request's grammar on a thread of its own
  (compiled grammars are cached by constraint); the EngineCore keeps the request out of
  the scheduler until ``ready`` says its grammar is there, so a slow compile never holds
  a step.
- ``bitmask(requests)`` fills one packed row per constrained request that samples this
  step (the runner applies it to that row's logits).
- ``accept(request_id, tokens)`` advances a matcher over the tokens the scheduler
  accepted; preemption and recompute keep the accepted tokens, so the state stays right.

The tokenizer is loaded, and the backend built, on the first constrained request.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from piston.step.sampling_params import StructuredOutputsParams
from piston.structured_output.backend import GrammarBackend, GrammarMatcher
from piston.structured_output.selection import make_backend

logger = logging.getLogger(__name__)

_CACHE_SIZE = 512


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class StructuredOutputManager:
    def __init__(self, backend_name: str, vocab_size: int, load_tokenizer: Callable[[], Any]) -> None:
        self.backend_name = backend_name
        self.vocab_size = vocab_size
        self._load_tokenizer = load_tokenizer
        self._backend: GrammarBackend | None = None
        self._backend_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="piston-grammar")
        self._compiled: dict[tuple[str, str], Future] = {}
        self._pending: dict[str, Future] = {}  # request id -> its grammar's future
        self.matchers: dict[str, GrammarMatcher] = {}

    @property
    def backend(self) -> GrammarBackend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = make_backend(self.backend_name, self._load_tokenizer(), self.vocab_size)
                logger.info("Structured outputs: %s grammars over a %d-token vocabulary.", self._backend.name,
                            self.vocab_size)
            return self._backend

    # ----- compiling ----------------------------------------------------------------

    def submit(self, request_id: str, params: StructuredOutputsParams) -> None:
        """Start compiling the request's grammar (or reuse the compiled one)."""
        key = params.key
        future = self._compiled.get(key)
        if future is None:
            if len(self._compiled) >= _CACHE_SIZE:
                self._compiled.pop(next(iter(self._compiled)))
            future = self._compiled[key] = self._pool.submit(lambda: self.backend.compile(params))
        self._pending[request_id] = future

    def ready(self, request_id: str) -> bool | str:
        """True once the request's matcher exists; the error text if its grammar failed;
        False while it compiles."""
        future = self._pending.get(request_id)
        if future is None:
            return True
        if not future.done():
            return False
        del self._pending[request_id]
        try:
            self.matchers[request_id] = self.backend.matcher(future.result())
        except Exception as e:
            return str(e) or type(e).__name__
        return True

    def wait_any(self, timeout: float) -> None:
        """Block until some pending grammar finishes compiling, or ``timeout`` passes."""
        from concurrent.futures import FIRST_COMPLETED, wait

        if self._pending:
            wait(set(self._pending.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ----- per step -----------------------------------------------------------------

    def bitmask(self, request_ids: list[str]) -> tuple[list[str], np.ndarray | None]:
        """Packed masks for the constrained ones among ``request_ids`` (requests that sample
        this step): their ids, and an int32 array [len(ids), ceil(vocab / 32)]."""
        constrained = [r for r in request_ids if r in self.matchers]
        if not constrained:
            return [], None
        mask = np.empty((len(constrained), bitmask_width(self.vocab_size)), dtype=np.int32)
        self.backend.fill_bitmasks([self.matchers[r] for r in constrained], mask)
        return constrained, mask

    def accept(self, request_id: str, token_ids: list[int]) -> bool:
        """Advance the request's matcher; False when the grammar rejects a token."""
        matcher = self.matchers.get(request_id)
        return matcher is None or matcher.accept_tokens(token_ids)

    def free(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        self.matchers.pop(request_id, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

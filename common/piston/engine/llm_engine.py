"""LLMEngine: the synchronous front end: validate, tokenize, step, detokenize."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Sequence

from piston.config import EngineConfig
from piston.engine.arg_utils import EngineArgs
from piston.engine.engine_core import EngineCore
from piston.engine.messages import EngineCoreRequest
from piston.engine.output_processor import OutputProcessor
from piston.outputs import RequestOutput
from piston.sampling_params import SamplingParams
from piston.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PromptType = str | Sequence[int]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.tokenizer = load_tokenizer(mc.path, mc.tokenizer)
        self.engine_core = EngineCore(config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.vocab_size = mc.hf_config.vocab_size
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ----- requests ---------------------------------------------------------------

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def process_prompt(self, prompt: PromptType, params: SamplingParams
                       ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate one prompt. Raises ValueError naming what is wrong."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}.")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character or token.")
            text, token_ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in prompt):
            text, token_ids = None, list(prompt)
        else:
            raise TypeError("prompt must be a string or a list of token ids, "
                            f"got {type(prompt).__name__}.")
        if not token_ids:
            raise ValueError("prompt is empty; give at least one character or token.")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for the model's "
                             f"vocabulary [0, {self.vocab_size}).")
        max_len = self.config.model_config.max_model_len
        n = len(token_ids)
        if n >= max_len:
            raise ValueError(f"The prompt is {n} tokens long, but the model's context is "
                             f"max_model_len={max_len} tokens (room is needed for at least one "
                             "generated token); shorten the prompt.")
        if params.max_tokens is None:
            params = params.clone(max_tokens=max_len - n)
        elif n + params.max_tokens > max_len:
            raise ValueError(f"max_tokens={params.max_tokens} exceeds the model's context "
                             f"({max_len} - {n} prompt tokens = {max_len - n}).")
        for t in params.stop_token_ids or ():
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary "
                                 f"[0, {self.vocab_size}).")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(f"logprobs={params.logprobs} exceeds the vocabulary size.")
        return text, token_ids, params

    def add_processed_request(self, request_id: str, prompt: str | None, token_ids: list[int],
                              params: SamplingParams, priority: int = 0) -> None:
        """Add a request already checked by ``process_prompt``."""
        children = [params] if params.n == 1 else [
            params.clone(n=1, seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)]
        engine_ids = self.output_processor.add_request(request_id, prompt, token_ids, children)
        eos = self.tokenizer.eos_token_id
        now = time.monotonic()
        for engine_id, child in zip(engine_ids, children):
            self.engine_core.add_request(EngineCoreRequest(
                engine_id, token_ids, child, eos_token_id=eos, arrival_time=now, priority=priority))

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None, priority: int = 0) -> None:
        text, token_ids, params = self.process_prompt(prompt, params or SamplingParams())
        self.add_processed_request(request_id, text, token_ids, params, priority)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            self.engine_core.abort_requests(self.output_processor.abort_request(request_id))

    # ----- stepping ---------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of the requests it advanced."""
        core_outputs = self.engine_core.step()
        outputs, to_abort = self.output_processor.process_outputs(core_outputs.outputs, final_only)
        if to_abort:
            self.engine_core.abort_requests(to_abort)
        return outputs

    def get_num_preemptions(self) -> int:
        return self.engine_core.scheduler.make_stats().num_preemptions

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        return self.engine_core.collective_rpc(method, args, kwargs)

    def shutdown(self) -> None:
        self.engine_core.shutdown()

"""LLMEngine: the synchronous front end: validate, tokenize, step, detokenize."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Iterable, Sequence

import msgspec

from piston.engine.arg_utils import EngineArgs
from piston.engine.core_client import EngineCoreClient
from piston.engine.input_processor import InputProcessor, PromptType
from piston.engine.output_processor import OutputProcessor
from piston.outputs import RequestOutput
from piston.step import named_tensors as wire_tensors
from piston.step.config import EngineConfig
from piston.step.engine_messages import EngineCoreRequest, SchedulerStats
from piston.step.lora_request import LoRARequest
from piston.step.sampling_params import SamplingParams
from piston.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Runs the EngineCore in its own process (or in this one with
    PISTON_ENGINE_IN_PROCESS=1) and turns its token ids into RequestOutputs."""

    def __init__(self, config: EngineConfig, multiprocess: bool | None = None) -> None:
        self.config = config
        mc = config.model_config

        def load() -> None:
            self.tokenizer = load_tokenizer(mc.path, mc.tokenizer)

        # The tokenizer loads while the engine process starts.
        self.engine_core = EngineCoreClient.make_client(config, asyncio_mode=False, multiprocess=multiprocess,
                                                        while_starting=load)
        self.input_processor = InputProcessor(config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._pending_adds: list[EngineCoreRequest] = []
        self._ids = itertools.count()
        self.sleeping = False  # set by this front end's own sleep and wake_up calls

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ----- requests ---------------------------------------------------------------

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def process_prompt(self, prompt: PromptType, params: SamplingParams
                       ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate one prompt. Raises ValueError naming what is wrong."""
        return self.input_processor.process_prompt(prompt, params)

    def add_processed_request(self, request_id: str, prompt: str | None, token_ids: list[int],
                              params: SamplingParams, priority: int = 0,
                              lora_request: LoRARequest | None = None) -> None:
        """Add a request already checked by ``process_prompt``.

        Adds are sent to the engine together at the next ``step``, so a batch built by
        several calls is scheduled as one.
        """
        children = self.input_processor.child_params(params)
        now = time.monotonic()
        engine_ids = self.output_processor.add_request(request_id, prompt, token_ids, children, now)
        eos = self.tokenizer.eos_token_id
        self._pending_adds.extend(
            EngineCoreRequest(engine_id, token_ids, child, eos_token_id=eos, arrival_time=now,
                              priority=priority, lora_request=lora_request)
            for engine_id, child in zip(engine_ids, children))

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> None:
        self.input_processor.check_lora(lora_request)
        text, token_ids, params = self.process_prompt(prompt, params or SamplingParams())
        self.add_processed_request(request_id, text, token_ids, params, priority, lora_request)

    # ----- LoRA adapters ------------------------------------------------------------------

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Check an adapter and read it into the workers' host memory ahead of its requests."""
        self.input_processor.check_lora(lora_request)
        return self.engine_core.call_utility("add_lora", lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests already running with it finish with it."""
        self.input_processor.forget_lora(lora_int_id)
        return self.engine_core.call_utility("remove_lora", lora_int_id)

    def list_loras(self) -> list[int]:
        return self.engine_core.call_utility("list_loras")

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        engine_ids = [i for request_id in request_ids
                      for i in self.output_processor.abort_request(request_id)]
        if self._pending_adds:  # never sent: drop them here
            dropped = set(engine_ids)
            self._pending_adds = [r for r in self._pending_adds if r.request_id not in dropped]
        if engine_ids:
            self.engine_core.abort_requests(engine_ids)

    # ----- stepping ---------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of the requests it advanced.

        Returns [] at once when no request is unfinished (it never waits on an idle engine).
        """
        if not self.has_unfinished_requests():
            return []
        if self._pending_adds:
            self.engine_core.add_requests(self._pending_adds)
            self._pending_adds = []
        core_outputs = self.engine_core.get_output()
        outputs, to_abort = self.output_processor.process_outputs(core_outputs.outputs, final_only)
        if to_abort:
            self.engine_core.abort_requests(to_abort)
        return outputs

    def get_stats(self) -> SchedulerStats:
        """The scheduler's state now (counts, KV cache use, preemptions so far)."""
        return msgspec.convert(self.engine_core.call_utility("get_stats"), SchedulerStats)

    def get_num_preemptions(self) -> int:
        return self.get_stats().num_preemptions

    def get_num_free_blocks(self) -> int:
        return self.engine_core.call_utility("get_num_free_blocks")

    def get_num_total_blocks(self) -> int:
        return self.engine_core.call_utility("get_num_total_blocks")

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.call_utility("reset_prefix_cache")

    # ----- sleep mode and weight updates -------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        self.engine_core.call_utility("sleep", level)
        self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.sleeping = bool(self.engine_core.call_utility("wake_up", tags))

    def is_sleeping(self) -> bool:
        return self.engine_core.call_utility("is_sleeping")

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Send ``(name, tensor)`` pairs to the workers in messages of bounded size;
        returns how many tensors were applied."""
        return sum(self.engine_core.call_utility("update_weights", batch)
                   for batch in wire_tensors.batches(named_tensors))

    def reload_weights(self) -> None:
        self.engine_core.call_utility("reload_weights")

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Call ``method`` on every worker; in multiprocess mode the results must be
        msgspec-encodable and come back as builtins (lists, dicts, numbers, strings)."""
        return self.engine_core.call_utility("collective_rpc", method, list(args), kwargs or {})

    def shutdown(self) -> None:
        self.engine_core.shutdown()

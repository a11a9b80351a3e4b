"""AsyncLLM: the asyncio front end the HTTP server uses.

One background task reads the engine process's outputs, detokenizes them and hands
each request its latest cumulative RequestOutput. A request whose consumer stops
listening is aborted in the engine at once, so its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import msgspec

from piston.engine.arg_utils import EngineArgs
from piston.engine.core_client import EngineCoreClient, EngineDeadError
from piston.engine.input_processor import InputProcessor, PromptType
from piston.engine.output_processor import OutputProcessor
from piston.engine.stat_logger import StatLogger
from piston.outputs import RequestOutput
from piston.step.engine_messages import EngineCoreRequest, SchedulerStats
from piston.step.sampling_params import SamplingParams
from piston.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class RequestOutputCollector:
    """The newest output of one request. Outputs are cumulative, so a slow consumer
    can skip intermediate ones without losing anything."""

    def __init__(self) -> None:
        self.output: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(self.output, BaseException):
            return  # an error is final
        self.output = item
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        item, self.output = self.output, None
        self.ready.clear()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncLLM:
    def __init__(self, args: EngineArgs) -> None:
        self.config = args.create_engine_config()
        mc = self.config.model_config
        self.tokenizer = load_tokenizer(mc.path, mc.tokenizer)
        self.input_processor = InputProcessor(self.config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core = EngineCoreClient.make_client(args, asyncio_mode=True)
        self.collectors: dict[str, RequestOutputCollector] = {}
        self.dead_error: BaseException | None = None
        self.last_stats: SchedulerStats | None = None
        self._output_task: asyncio.Task | None = None
        self.stat_logger = StatLogger()
        self._pending_prompt_tokens = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(args)

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    def process_prompt(self, prompt: PromptType, params: SamplingParams):
        return self.input_processor.process_prompt(prompt, params)

    # ----- requests ---------------------------------------------------------------

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str,
                       priority: int = 0, client_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it.

        Raises ValueError before the first yield for invalid input, and EngineDeadError
        if the engine dies. Stopping the iteration aborts the request in the engine.
        """
        if self.dead_error is not None:
            raise EngineDeadError(f"The engine is not running: {self.dead_error}")
        text, token_ids, params = self.process_prompt(prompt, sampling_params)
        self._ensure_output_task()
        collector = RequestOutputCollector()
        now = time.monotonic()
        children = self.input_processor.child_params(params)
        engine_ids = self.output_processor.add_request(request_id, text, token_ids, children, now)
        self._pending_prompt_tokens += len(token_ids) * len(children)
        self.collectors[request_id] = collector
        finished = False
        try:
            eos = self.tokenizer.eos_token_id
            await self.engine_core.add_requests_async([
                EngineCoreRequest(engine_id, token_ids, child, eos_token_id=eos, arrival_time=now,
                                  priority=priority, client_id=client_id)
                for engine_id, child in zip(engine_ids, children)])
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            self.collectors.pop(request_id, None)
            if not finished:
                await self._abort_quietly(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its consumer's iteration ends with no further output."""
        self.collectors.pop(request_id, None)
        await self._abort_quietly(request_id)

    async def _abort_quietly(self, request_id: str) -> None:
        engine_ids = self.output_processor.abort_request(request_id)
        if engine_ids and self.dead_error is None:
            try:
                await self.engine_core.abort_requests_async(engine_ids)
            except EngineDeadError:
                pass

    # ----- the output loop ----------------------------------------------------------

    def _ensure_output_task(self) -> None:
        if self._output_task is None or self._output_task.done():
            self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    async def _output_loop(self) -> None:
        try:
            while True:
                outputs = await self.engine_core.get_output_async()
                if outputs.scheduler_stats is not None:
                    self.last_stats = outputs.scheduler_stats
                self.stat_logger.record(outputs, self._pending_prompt_tokens)
                self._pending_prompt_tokens = 0
                if not outputs.outputs:
                    continue
                request_outputs, to_abort = self.output_processor.process_outputs(outputs.outputs)
                for out in request_outputs:
                    collector = self.collectors.get(out.request_id)
                    if collector is not None:
                        collector.put(out)
                if to_abort:
                    await self.engine_core.abort_requests_async(to_abort)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine died: fail every request, loudly
            self.dead_error = e if isinstance(e, EngineDeadError) else EngineDeadError(str(e))
            logger.error("Engine failed: %s", self.dead_error)
            for collector in list(self.collectors.values()):
                collector.put(self.dead_error)

    # ----- health and stats ---------------------------------------------------------

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine process is gone."""
        if self.dead_error is not None:
            raise self.dead_error
        try:
            await self.engine_core.call_utility_async("get_num_total_blocks")
        except EngineDeadError as e:
            self.dead_error = e
            for collector in list(self.collectors.values()):
                collector.put(e)
            raise

    async def get_stats(self) -> SchedulerStats:
        """The scheduler's current state, fetched from the engine."""
        stats = msgspec.convert(await self.engine_core.call_utility_async("get_stats"), SchedulerStats)
        self.last_stats = stats
        return stats

    async def get_num_free_blocks(self) -> int:
        return await self.engine_core.call_utility_async("get_num_free_blocks")

    async def get_num_total_blocks(self) -> int:
        return await self.engine_core.call_utility_async("get_num_total_blocks")

    def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        self.engine_core.shutdown()

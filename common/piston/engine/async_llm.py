"""AsyncLLM: the asyncio front end the HTTP server uses.

The event loop only routes: tokenization runs on a thread of its own (with its own copy of
the tokenizer), and detokenizing the engine's outputs runs on another, so a 100k-token
prompt or a burst of long streams never stalls the other requests' streams. One
background task reads the engine process's outputs and hands each request its latest
cumulative RequestOutput. A request whose consumer stops listening is aborted in the
engine at once, so its KV blocks return to the pool.

Faults: a request that fails (in the engine, or while its output is processed) raises
EngineRequestError to its own consumer only. Only the engine's death fails every request.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import msgspec

from piston.engine.arg_utils import EngineArgs
from piston.engine.core_client import EngineCoreClient, EngineDeadError, EngineHealth
from piston.engine.input_processor import InputProcessor, PromptType
from piston.engine.output_processor import EngineRequestError, OutputProcessor
from piston.engine.stat_logger import StatLogger
from piston.outputs import RequestOutput
from piston.step.engine_messages import EngineCoreRequest, SchedulerStats
from piston.step.lora_request import LoRARequest
from piston.step.sampling_params import SamplingParams
from piston.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """More requests wait in the engine than the server allows; retry later."""


class EngineSleepingError(EngineOverloadedError):
    """The engine is asleep (sleep mode): new requests are refused until it wakes up."""


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
    """``max_waiting_requests``: how many engine requests may wait beyond the
    ``max_num_seqs`` that run; past it ``generate`` raises EngineOverloadedError (None: no bound)."""

    def __init__(self, args: EngineArgs, max_waiting_requests: int | None = None) -> None:
        self.config = args.create_engine_config()
        self.config.scheduler_config.online = True
        mc = self.config.model_config

        def load() -> None:
            self.tokenizer = load_tokenizer(mc.path, mc.tokenizer)

        # The tokenizer loads while the engine process starts.
        self.engine_core = EngineCoreClient.make_client(self.config, asyncio_mode=True, while_starting=load)
        # Tokenization has its own copy: the tokenizer's Rust core must not be entered from
        # two threads at once while the output thread decodes with the other copy.
        self.input_processor = InputProcessor(self.config, copy.deepcopy(self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.max_requests = None if max_waiting_requests is None else \
            self.config.scheduler_config.max_num_seqs + max_waiting_requests
        self.collectors: dict[str, RequestOutputCollector] = {}
        self.dead_error: BaseException | None = None
        self._output_task: asyncio.Task | None = None
        self._tokenize_thread = ThreadPoolExecutor(1, thread_name_prefix="piston-tokenize")
        self._output_thread = ThreadPoolExecutor(1, thread_name_prefix="piston-detokenize")
        self.stat_logger = StatLogger()
        self._pending_prompt_tokens = 0
        self.sleeping = False  # set by this front end's sleep and wake_up calls

    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_waiting_requests: int | None = None) -> "AsyncLLM":
        return cls(args, max_waiting_requests)

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    # ----- off the event loop -----------------------------------------------------------

    async def _in_thread(self, pool: ThreadPoolExecutor, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def process_prompt(self, prompt: PromptType, params: SamplingParams
                             ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate one prompt on the tokenizer thread (ValueError if bad)."""
        return await self._in_thread(self._tokenize_thread, self.input_processor.process_prompt, prompt, params)

    async def tokenize_chat(self, conversation: list[dict], add_generation_prompt: bool,
                            tools: list[dict] | None = None, chat_template: str | None = None) -> list[int]:
        """The conversation (and the tools, for templates that show them) through the chat
        template (``chat_template``, else the model's), as token ids (on the tokenizer thread)."""
        def encode() -> list[int]:
            tokenizer = self.input_processor.tokenizer
            text = tokenizer.apply_chat_template(conversation, tokenize=False, tools=tools,
                                                 add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template)
            # The template already holds any special tokens the model expects.
            return tokenizer(text, add_special_tokens=False).input_ids

        return await self._in_thread(self._tokenize_thread, encode)

    async def decode(self, token_ids: list[int]) -> str:
        return await self._in_thread(self._output_thread, self.tokenizer.decode, token_ids)

    # ----- requests ---------------------------------------------------------------

    def num_unfinished_requests(self) -> int:
        """Engine requests (``n`` counts each) that have not finished yet."""
        return len(self.output_processor.child_to_parent)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str,
                       priority: int = 0, client_id: str | None = None, received_time: float | None = None,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it.

        ``received_time``: when the request reached the server (time.monotonic), kept in
        its metrics for the request timeline.

        Raises ValueError before the first yield for invalid input, EngineOverloadedError
        when too many requests wait, EngineRequestError if this request fails and
        EngineDeadError if the engine dies. Stopping the iteration aborts the request.
        """
        if self.dead_error is not None:
            raise EngineDeadError(f"The engine is not running: {self.dead_error}")
        if self.sleeping:
            raise EngineSleepingError("The engine is asleep (sleep mode); retry after POST /wake_up.")
        if not self.input_processor.lora_checked(lora_request):  # reads the adapter once: off the event loop
            await self._in_thread(self._tokenize_thread, self.input_processor.check_lora, lora_request)
        text, token_ids, params = await self.process_prompt(prompt, sampling_params)
        if self.max_requests is not None and self.num_unfinished_requests() + params.n > self.max_requests:
            raise EngineOverloadedError(
                f"The server is at capacity ({self.num_unfinished_requests()} requests running or waiting, "
                f"limit {self.max_requests}); retry shortly.")
        self._ensure_output_task()
        collector = RequestOutputCollector()
        now = time.monotonic()
        children = self.input_processor.child_params(params)
        engine_ids = await self._in_thread(self._output_thread, self.output_processor.add_request, request_id,
                                           text, token_ids, children, now, received_time)
        self._pending_prompt_tokens += len(token_ids) * len(children)
        self.collectors[request_id] = collector
        finished = False
        try:
            eos = self.tokenizer.eos_token_id
            await self.engine_core.add_requests_async([
                EngineCoreRequest(engine_id, token_ids, child, eos_token_id=eos, arrival_time=now,
                                  priority=priority, client_id=client_id, lora_request=lora_request)
                for engine_id, child in zip(engine_ids, children)])
            while not finished:
                out = await collector.get()
                finished = out.finished
                if out.error is not None:
                    raise EngineRequestError(f"Request {request_id} failed: {out.error}")
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
        engine_ids = await self._in_thread(self._output_thread, self.output_processor.abort_request, request_id)
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
        while True:
            try:
                outputs = await self.engine_core.get_output_async()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # the engine died: fail every request, loudly
                self._mark_dead(e)
                return
            try:
                await self._dispatch(outputs)
            except asyncio.CancelledError:
                raise
            except EngineDeadError as e:
                self._mark_dead(e)
                return
            except Exception:  # a front-end bug must not stop the other requests' outputs
                logger.exception("Dispatching engine outputs failed")

    @property
    def last_stats(self) -> SchedulerStats | None:
        """The scheduler's state as of the engine's last step or heartbeat (no round trip)."""
        return self.engine_core.latest_stats

    async def _dispatch(self, outputs) -> None:
        received_time = time.monotonic()
        self.stat_logger.record(outputs, self._pending_prompt_tokens)
        self._pending_prompt_tokens = 0
        if not outputs.outputs:
            return
        # Detokenizing happens on the output thread; it isolates each request's failure.
        request_outputs, to_abort = await self._in_thread(self._output_thread, self.output_processor.process_outputs,
                                                          outputs.outputs, False, received_time)
        for out in request_outputs:
            collector = self.collectors.get(out.request_id)
            if collector is not None:
                collector.put(out)
        if to_abort:
            await self.engine_core.abort_requests_async(to_abort)

    def _mark_dead(self, e: BaseException) -> None:
        self.dead_error = e if isinstance(e, EngineDeadError) else EngineDeadError(str(e))
        logger.error("Engine failed: %s", self.dead_error)
        for collector in list(self.collectors.values()):
            collector.put(self.dead_error)

    # ----- health and stats ---------------------------------------------------------

    def health(self) -> EngineHealth:
        """Whether the engine is alive: from its heartbeats, without waiting for a step.
        A dead engine also fails every request that is still running."""
        health = self.engine_core.health()
        if health.state == "dead" and self.dead_error is None:
            self._mark_dead(EngineDeadError(health.detail))
        return health

    async def get_stats(self) -> SchedulerStats:
        """The scheduler's current state, fetched from the engine."""
        return msgspec.convert(await self.engine_core.call_utility_async("get_stats"), SchedulerStats)

    async def get_num_free_blocks(self) -> int:
        return await self.engine_core.call_utility_async("get_num_free_blocks")

    async def get_num_total_blocks(self) -> int:
        return await self.engine_core.call_utility_async("get_num_total_blocks")

    # ----- LoRA adapters ----------------------------------------------------------------------

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Check an adapter (LoRAAdapterError, a ValueError, naming what is wrong) and read it
        into the workers' host memory."""
        await self._in_thread(self._tokenize_thread, self.input_processor.check_lora, lora_request)
        return await self.engine_core.call_utility_async("add_lora", lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests already running with it finish with it."""
        self.input_processor.forget_lora(lora_int_id)
        return await self.engine_core.call_utility_async("remove_lora", lora_int_id)

    async def list_loras(self) -> list[int]:
        return await self.engine_core.call_utility_async("list_loras")

    async def reset_prefix_cache(self) -> bool:
        return await self.engine_core.call_utility_async("reset_prefix_cache")

    # ----- sleep mode (the server's dev-mode endpoints) ----------------------------------

    async def sleep(self, level: int = 1) -> None:
        """Put the engine to sleep (EngineCore.sleep). New requests get EngineSleepingError
        until it is fully awake; requests already streaming wait and resume after it."""
        self.sleeping = True  # refuse new requests from now on, not from when the engine answers
        try:
            await self.engine_core.call_utility_async("sleep", level)
        except BaseException:
            self.sleeping = await self.is_sleeping() if self.dead_error is None else False
            raise

    async def wake_up(self, tags: list[str] | None = None) -> list[str]:
        """Wake "weights" and/or "kv_cache" (None: both); returns what is still asleep."""
        still = await self.engine_core.call_utility_async("wake_up", tags)
        self.sleeping = bool(still)
        return still

    async def is_sleeping(self) -> bool:
        return await self.engine_core.call_utility_async("is_sleeping")

    def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        self.engine_core.shutdown()
        self._tokenize_thread.shutdown(wait=False, cancel_futures=True)
        self._output_thread.shutdown(wait=False, cancel_futures=True)

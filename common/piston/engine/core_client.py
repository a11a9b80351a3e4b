"""Clients of the EngineCore: in this process, or in an engine process over ZMQ.

Every client has the same calls: add_request, abort_requests, get_output (the next
EngineCoreOutputs), call_utility (an EngineCore method by name) and shutdown; the
asyncio client has ``*_async`` versions. Once the engine process is gone every call
raises EngineDeadError with its exit code and the error text it sent.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future
from multiprocessing.connection import wait as wait_for_fds
from typing import Any, Callable, NamedTuple

import msgspec
import zmq
import zmq.asyncio

from piston.child_process import ChildProcess
from piston.engine.arg_utils import EngineArgs
from piston.step.config import EngineConfig
from piston.step.config_codec import encode_engine_config
from piston.step.engine_messages import (
    ENGINE_DEAD_CALL_ID,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreRequestType,
    Heartbeat,
    SchedulerStats,
    UtilityOutput,
    UtilityRequest,
)

# How often a waiting client wakes to check that the engine process is alive.
_POLL_MS = 100
_STARTUP_TIMEOUT_S = 600
# The engine sends a heartbeat every second; this much silence means it is not answering.
HEARTBEAT_TIMEOUT_S = 15.0


class EngineDeadError(RuntimeError):
    """The engine process exited; no request can make progress any more."""


class EngineCoreClient:
    """The interface LLMEngine (sync) and AsyncLLM (asyncio) drive the engine through."""

    engine_pid: int

    @staticmethod
    def make_client(engine: EngineArgs | EngineConfig, asyncio_mode: bool,
                    multiprocess: bool | None = None,
                    while_starting: Callable[[], Any] | None = None) -> "EngineCoreClient":
        """A client for a new engine. Multiprocess unless PISTON_ENGINE_IN_PROCESS=1.

        ``while_starting`` runs in this process while the engine process starts (loading
        the tokenizer, say), so the two overlap; in-process, it runs after.
        """
        config = engine.create_engine_config() if isinstance(engine, EngineArgs) else engine
        if multiprocess is None:
            multiprocess = os.environ.get("PISTON_ENGINE_IN_PROCESS", "0") != "1"
        if asyncio_mode:
            if not multiprocess:
                raise ValueError("The asyncio client needs the engine in its own process; "
                                 "unset PISTON_ENGINE_IN_PROCESS.")
            return AsyncMPClient(config, while_starting)
        if multiprocess:
            return SyncMPClient(config, while_starting)
        client = InprocClient(config)
        if while_starting is not None:
            while_starting()
        return client

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Add requests together, so the engine schedules them in the same step."""
        raise NotImplementedError

    def abort_requests(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    def get_output(self) -> EngineCoreOutputs:
        raise NotImplementedError

    def call_utility(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class InprocClient(EngineCoreClient):
    """The EngineCore in this process; get_output runs one step."""

    def __init__(self, config: EngineConfig) -> None:
        from piston.engine.engine_core import EngineCore

        self.engine_core = EngineCore(config)
        self.engine_pid = os.getpid()

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        for request in requests:
            self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine_core.step()

    def call_utility(self, method: str, *args: Any) -> Any:
        return getattr(self.engine_core, method)(*args)

    def shutdown(self) -> None:
        self.engine_core.shutdown()


class _EngineProcess:
    """The engine process, its socket files and its ZMQ context: what shutdown cleans up.

    Holds no reference to the client, so a forgotten client is collected and its
    weakref.finalize (which also runs at exit) stops the process.
    """

    def __init__(self, config: EngineConfig, ctx: zmq.Context,
                 while_starting: Callable[[], Any] | None = None) -> None:
        self.ctx = ctx
        self.tmpdir = tempfile.mkdtemp(prefix="piston-engine-")
        self.input_addr = f"ipc://{self.tmpdir}/input"
        self.output_addr = f"ipc://{self.tmpdir}/output"
        self.input_socket = ctx.socket(zmq.PUSH)
        self.input_socket.bind(self.input_addr)
        self.output_socket = ctx.socket(zmq.PULL)
        self.output_socket.bind(self.output_addr)
        self.proc = ChildProcess("piston.engine.core_proc", [self.input_addr, self.output_addr],
                                 encode_engine_config(config), ready_pipe=True)
        if while_starting is not None:
            try:
                while_starting()
            except BaseException:
                self.close()
                raise
        self.ready = self._wait_ready(self.proc.ready_conn)

    def _wait_ready(self, conn) -> EngineCoreReady:
        try:
            # Wakes on the handshake or on the process exiting, whichever comes first.
            if not wait_for_fds([conn, self.proc.sentinel], timeout=_STARTUP_TIMEOUT_S):
                raise RuntimeError(f"The engine process did not start in {_STARTUP_TIMEOUT_S} s.")
            try:
                ready = msgspec.msgpack.decode(conn.recv_bytes(), type=EngineCoreReady)
            except EOFError:
                self.proc.join(5)
                raise RuntimeError(
                    f"The engine process exited during start-up with code {self.proc.exitcode}; "
                    "see its log above.") from None
        except BaseException:
            self.close()
            raise
        finally:
            conn.close()
        if ready.error is not None:
            self.proc.join(5)  # it exits right after saying why
            self.close()
            cls = getattr(builtins, ready.error_type, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = RuntimeError
            raise cls(ready.error)
        return ready

    def is_alive(self) -> bool:
        return not wait_for_fds([self.proc.sentinel], timeout=0)

    def _send_shutdown(self) -> None:
        if isinstance(self.ctx, zmq.asyncio.Context):
            # Called outside the event loop too: a plain socket shadowing the asyncio one.
            sock = zmq.Socket.shadow(self.input_socket.underlying)
        else:
            sock = self.input_socket
        if sock.poll(1000, zmq.POLLOUT):
            sock.send_multipart([EngineCoreRequestType.SHUTDOWN.value, b""], flags=zmq.NOBLOCK)

    def close(self) -> None:
        """Ask the engine to stop, then make sure it has; idempotent."""
        if self.proc.is_alive():
            try:
                self._send_shutdown()
            except zmq.ZMQError:
                pass  # the socket is unusable: terminate below
        self.proc.stop(grace_s=5)
        self.proc.close()
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class EngineHealth(NamedTuple):
    healthy: bool
    state: str  # "idle", "busy" (healthy); "dead", "unresponsive", "wedged" (not)
    detail: str


class _OutputRouter:
    """Decodes engine messages and routes them: outputs to a queue, utility replies to
    their waiting future. Knows when the engine is dead and why. No link to the client."""

    def __init__(self, engine: _EngineProcess, outputs: Any) -> None:
        self.engine = engine
        self.outputs = outputs  # queue.Queue or asyncio.Queue: it gets outputs, then the error
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.pending: dict[int, Any] = {}  # call_id -> Future / asyncio.Future
        self.lock = threading.Lock()
        self.dead: EngineDeadError | None = None
        self.dead_text = ""  # what the engine said before exiting, if anything
        # The engine's latest heartbeat and when it arrived (monotonic seconds).
        self.heartbeat: Heartbeat | None = None
        self.heartbeat_at = time.monotonic()
        # The scheduler's latest state, from step outputs and heartbeats alike.
        self.stats: SchedulerStats | None = None
        # When the latest step output arrived: a step the last heartbeat saw running has
        # ended if output came after it began (both are CLOCK_MONOTONIC readings).
        self.output_at = 0.0

    def route(self, frame: bytes) -> None:
        outputs = self.decoder.decode(frame)
        if outputs.heartbeat is not None:
            self.heartbeat, self.heartbeat_at = outputs.heartbeat, time.monotonic()
            self.stats = outputs.heartbeat.scheduler_stats or self.stats
            return
        if outputs.scheduler_stats is not None:
            self.stats = outputs.scheduler_stats
            self.output_at = time.monotonic()
        reply = outputs.utility_output
        if reply is None:
            self.outputs.put_nowait(outputs)
        elif reply.call_id == ENGINE_DEAD_CALL_ID:
            self.dead_text = reply.failure or ""
        else:
            with self.lock:
                future = self.pending.pop(reply.call_id, None)
            if future is not None and not future.done():
                future.set_result(reply)

    def mark_dead(self) -> None:
        """Fail every waiter, now and later, with the engine's exit code and error text."""
        proc = self.engine.proc
        proc.join(1)
        text = f"The engine process (pid {proc.pid}) exited with code {proc.exitcode}"
        with self.lock:
            self.dead = EngineDeadError(text + (f":\n{self.dead_text}" if self.dead_text
                                                else "; see its log above."))
            pending, self.pending = list(self.pending.values()), {}
        for future in pending:
            if not future.done():
                future.set_exception(self.dead)
        self.outputs.put_nowait(self.dead)

    def register(self, call_id: int, future: Any) -> None:
        with self.lock:
            if self.dead is not None:
                raise self.dead
            self.pending[call_id] = future

    def health(self) -> "EngineHealth":
        """Whether the engine is alive, from its heartbeats: no round trip to the busy loop."""
        now = time.monotonic()
        if self.dead is not None or not self.engine.is_alive():
            return EngineHealth(False, "dead", str(self.dead or "the engine process exited"))
        silent = now - self.heartbeat_at
        if silent > HEARTBEAT_TIMEOUT_S:
            return EngineHealth(False, "unresponsive", f"no heartbeat from the engine for {silent:.0f} s")
        beat = self.heartbeat
        if beat is None or not beat.step_started_at or self.output_at > beat.step_started_at:
            return EngineHealth(True, "idle", "")
        busy = now - beat.step_started_at
        if busy > beat.step_deadline_s:
            return EngineHealth(False, "wedged", f"one engine step has run for {busy:.0f} s, past its "
                                                 f"{beat.step_deadline_s:.0f} s deadline")
        return EngineHealth(True, "busy", f"in a step for {busy:.1f} s (deadline {beat.step_deadline_s:.0f} s)")

    def check(self) -> None:
        if self.dead is not None:
            raise self.dead


def _utility_result(reply: UtilityOutput, method: str) -> Any:
    if reply.failure is not None:
        raise RuntimeError(f"Engine utility call {method!r} failed: {reply.failure}")
    return reply.result


def _read_outputs(router: _OutputRouter, stop: threading.Event) -> None:
    """The sync client's reader thread: the only user of the output socket."""
    sock, engine = router.engine.output_socket, router.engine
    while not stop.is_set():
        if sock.poll(_POLL_MS):
            router.route(sock.recv(copy=False).buffer)
        elif not engine.is_alive():
            while sock.poll(0):  # the dead signal may still be in the socket
                router.route(sock.recv(copy=False).buffer)
            router.mark_dead()
            return


def _stop_sync(stop: threading.Event, reader: threading.Thread, engine: _EngineProcess) -> None:
    stop.set()
    reader.join(timeout=5)
    engine.close()


class SyncMPClient(EngineCoreClient):
    """The engine in a spawned process; blocking calls for LLMEngine."""

    def __init__(self, config: EngineConfig, while_starting: Callable[[], Any] | None = None) -> None:
        engine = _EngineProcess(config, zmq.Context(), while_starting)
        _adopt_engine_facts(config, engine)
        self.engine_pid = engine.proc.pid
        self._engine = engine
        self._encoder = msgspec.msgpack.Encoder()
        self._call_ids = itertools.count()
        self._outputs: queue.Queue = queue.Queue()
        self._router = _OutputRouter(engine, self._outputs)
        stop = threading.Event()
        reader = threading.Thread(target=_read_outputs, args=(self._router, stop),
                                  name="EngineCoreOutputReader", daemon=True)
        reader.start()
        self._finalizer = weakref.finalize(self, _stop_sync, stop, reader, engine)

    def _send(self, kind: EngineCoreRequestType, payload: Any) -> None:
        frames = [kind.value, self._encoder.encode(payload)]
        # A PUSH socket blocks while it has no peer: wait in slices, checking the engine.
        while True:
            self._router.check()
            if self._engine.input_socket.poll(_POLL_MS, zmq.POLLOUT):
                self._engine.input_socket.send_multipart(frames, copy=False)
                return

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._send(EngineCoreRequestType.ADD, requests)

    def abort_requests(self, request_ids: list[str]) -> None:
        self._send(EngineCoreRequestType.ABORT, list(request_ids))

    def get_output(self, timeout: float | None = None) -> EngineCoreOutputs:
        """The next outputs message; raises EngineDeadError once the engine is gone,
        queue.Empty after ``timeout`` seconds."""
        self._router.check()
        item = self._outputs.get(timeout=timeout)
        if isinstance(item, EngineDeadError):
            self._outputs.put(item)  # later callers see it too
            raise item
        return item

    def call_utility(self, method: str, *args: Any) -> Any:
        """``EngineCore.<method>(*args)`` in the engine process; its result as builtins."""
        call_id = next(self._call_ids)
        future: Future = Future()
        self._router.register(call_id, future)
        self._send(EngineCoreRequestType.UTILITY, UtilityRequest(call_id, method, list(args)))
        return _utility_result(future.result(), method)

    @property
    def is_dead(self) -> bool:
        return self._router.dead is not None

    def shutdown(self) -> None:
        """Stop the engine process and free its sockets; safe to call twice."""
        with self._router.lock:
            self._router.dead = self._router.dead or EngineDeadError("The engine was shut down.")
        self._finalizer()


class AsyncMPClient(EngineCoreClient):
    """The engine in a spawned process; asyncio calls for AsyncLLM (zmq.asyncio)."""

    def __init__(self, config: EngineConfig, while_starting: Callable[[], Any] | None = None) -> None:
        engine = _EngineProcess(config, zmq.asyncio.Context(), while_starting)
        _adopt_engine_facts(config, engine)
        self.engine_pid = engine.proc.pid
        self._engine = engine
        self._encoder = msgspec.msgpack.Encoder()
        self._call_ids = itertools.count()
        self._router: _OutputRouter | None = None  # made on first use, in the running loop
        self._reader: asyncio.Task | None = None
        self._finalizer = weakref.finalize(self, engine.close)

    def _ensure_reader(self) -> _OutputRouter:
        if self._router is None:
            self._router = _OutputRouter(self._engine, asyncio.Queue())
            self._reader = asyncio.get_running_loop().create_task(self._read_outputs())
        return self._router

    async def _read_outputs(self) -> None:
        router, engine = self._router, self._engine
        sock = engine.output_socket
        while True:
            if await sock.poll(_POLL_MS):
                router.route(await sock.recv())
            elif not engine.is_alive():
                while await sock.poll(0):
                    router.route(await sock.recv())
                router.mark_dead()
                return

    async def _send(self, kind: EngineCoreRequestType, payload: Any) -> None:
        router = self._ensure_reader()
        frames = [kind.value, self._encoder.encode(payload)]
        while True:
            router.check()
            if await self._engine.input_socket.poll(_POLL_MS, zmq.POLLOUT):
                await self._engine.input_socket.send_multipart(frames)
                return

    async def add_requests_async(self, requests: list[EngineCoreRequest]) -> None:
        await self._send(EngineCoreRequestType.ADD, requests)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        await self._send(EngineCoreRequestType.ABORT, list(request_ids))

    async def get_output_async(self) -> EngineCoreOutputs:
        """The next outputs message; raises EngineDeadError once the engine is gone."""
        router = self._ensure_reader()
        router.check()
        item = await router.outputs.get()
        if isinstance(item, EngineDeadError):
            router.outputs.put_nowait(item)
            raise item
        return item

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        """``EngineCore.<method>(*args)`` in the engine process; its result as builtins."""
        router = self._ensure_reader()
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        router.register(call_id, future)
        await self._send(EngineCoreRequestType.UTILITY, UtilityRequest(call_id, method, list(args)))
        return _utility_result(await future, method)

    def health(self) -> EngineHealth:
        """The engine's health from its heartbeats (call in the running loop)."""
        return self._ensure_reader().health()

    @property
    def latest_stats(self) -> SchedulerStats | None:
        """The scheduler's state as of the engine's last step or heartbeat (no round trip)."""
        return self._router.stats if self._router is not None else None

    def shutdown(self) -> None:
        """Stop the engine process and free its sockets; safe to call twice."""
        if self._router is not None:
            self._router.dead = self._router.dead or EngineDeadError("The engine was shut down.")
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._finalizer()


def _adopt_engine_facts(config: EngineConfig, engine: _EngineProcess) -> None:
    # The engine decided these and said so in its handshake; the front end keeps its own copy.
    config.platform = engine.ready.platform
    config.cache_config.num_blocks = engine.ready.num_blocks
    config.cache_config.kv_cache_memory = engine.ready.kv_cache_memory

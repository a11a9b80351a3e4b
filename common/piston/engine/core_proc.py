"""EngineCoreProc: the EngineCore busy loop in its own process, fed over ZMQ.

The wire protocol and its message types are in piston.step.engine_messages. The process
is started by piston.child_process (``python -m piston.engine.core_proc IN OUT``); its
start-up handshake goes back over the pipe the launcher provides. Two threads do the
socket work, so encoding and sending overlap model execution.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback
from typing import Any

import msgspec
import zmq

from piston.child_process import ChildContext, exit_now
from piston.step.config import EngineConfig
from piston.engine.engine_core import STEP_TIMEOUT_S, EngineCore
from piston.step.config_codec import decode_engine_config
from piston.step.engine_messages import (
    ENGINE_DEAD_CALL_ID,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreRequestType,
    Heartbeat,
    UtilityOutput,
    UtilityRequest,
)

logger = logging.getLogger(__name__)

# How often the input thread wakes to check that the parent process is still alive.
_PARENT_POLL_MS = 1000
HEARTBEAT_INTERVAL_S = 1.0


class EngineCoreProc:
    """Runs an EngineCore; an input thread feeds it, an output thread sends its results."""

    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str,
                 child: ChildContext) -> None:
        self.child = child
        self.input_queue: queue.Queue[tuple[EngineCoreRequestType, Any]] = queue.Queue()
        self.output_queue: queue.Queue[EngineCoreOutputs | None] = queue.Queue()
        self.engine_core = EngineCore(config)
        # Sockets only after a successful start-up: a failed one then leaves nothing to close.
        self.ctx = zmq.Context()
        self.input_thread = threading.Thread(target=self._input_loop, args=(input_addr,),
                                             name="EngineCoreInput", daemon=True)
        self.output_thread = threading.Thread(target=self._output_loop, args=(output_addr,),
                                              name="EngineCoreOutput", daemon=True)
        self.stopping = threading.Event()
        self.heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="EngineCoreHeartbeat",
                                                 daemon=True)
        self.input_thread.start()
        self.output_thread.start()
        self.heartbeat_thread.start()

    # ----- socket threads ---------------------------------------------------------------

    def _input_loop(self, addr: str) -> None:
        decoders = {EngineCoreRequestType.ADD: msgspec.msgpack.Decoder(list[EngineCoreRequest]),
                    EngineCoreRequestType.ABORT: msgspec.msgpack.Decoder(list[str]),
                    EngineCoreRequestType.UTILITY: msgspec.msgpack.Decoder(UtilityRequest)}
        sock = self.ctx.socket(zmq.PULL)
        sock.connect(addr)
        try:
            while True:
                if not sock.poll(_PARENT_POLL_MS):
                    if not self.child.parent_alive():
                        logger.warning("The front-end process died; the engine shuts down.")
                        self.input_queue.put((EngineCoreRequestType.SHUTDOWN, None))
                        return
                    continue
                type_frame, payload = sock.recv_multipart()
                kind = EngineCoreRequestType(type_frame)
                decoder = decoders.get(kind)
                message = decoder.decode(payload) if decoder else None
                if kind is EngineCoreRequestType.ADD:
                    now = time.monotonic()
                    for request in message:
                        request.received_time = now
                self.input_queue.put((kind, message))
                if kind is EngineCoreRequestType.SHUTDOWN:
                    return
        except Exception:
            # A message we cannot read is a front-end bug: stop the engine and say why.
            self.input_queue.put((None, traceback.format_exc()))
        finally:
            sock.close(linger=0)

    def _output_loop(self, addr: str) -> None:
        encoder = msgspec.msgpack.Encoder()
        sock = self.ctx.socket(zmq.PUSH)
        sock.connect(addr)
        try:
            while (outputs := self.output_queue.get()) is not None:
                sock.send(encoder.encode(outputs), copy=False)
        finally:
            # Give the last messages (the dead signal above all) time to reach the front end.
            sock.close(linger=5000)

    def _heartbeat_loop(self) -> None:
        """Every second, what the busy loop is doing: the front end's /health reads it, so a
        long step is not mistaken for a dead engine, and a wedged one is noticed."""
        core = self.engine_core
        while not self.stopping.wait(HEARTBEAT_INTERVAL_S):
            self.output_queue.put(EngineCoreOutputs(heartbeat=Heartbeat(
                sent_at=time.monotonic(), step_started_at=core.busy_since,
                step_deadline_s=core.busy_deadline_s, num_steps=core.num_steps, scheduler_stats=core.stats)))

    # ----- the busy loop ----------------------------------------------------------------

    def run_busy_loop(self) -> int:
        """Serve requests until SHUTDOWN or the parent dies (returns 0) or a step fails
        (sends the dead signal, returns 1)."""
        core = self.engine_core
        try:
            while True:
                # An idle engine blocks here, using no CPU, until the front end sends something.
                item = self.input_queue.get() if not core.can_step() else None
                while item is not None or not self.input_queue.empty():
                    if item is None:
                        item = self.input_queue.get_nowait()
                    if not self._handle(*item):
                        return 0
                    item = None
                if core.can_step():
                    outputs = core.step()
                    if outputs.outputs:
                        self.output_queue.put(outputs)
        except Exception:
            text = traceback.format_exc()
            logger.error("The engine core failed:\n%s", text)
            self._send_dead(text)
            return 1
        finally:
            self.stopping.set()
            self.output_queue.put(None)
            self.output_thread.join(timeout=10)
            core.shutdown()
            self.ctx.term()

    def _handle(self, kind: EngineCoreRequestType | None, payload: Any) -> bool:
        """Apply one front-end message; False means stop serving."""
        if kind is EngineCoreRequestType.ADD:
            for request in payload:
                self.engine_core.add_request(request)
            self.engine_core.stats = self.engine_core.scheduler.make_stats()
        elif kind is EngineCoreRequestType.ABORT:
            self.engine_core.abort_requests(payload)
            self.engine_core.stats = self.engine_core.scheduler.make_stats()
        elif kind is EngineCoreRequestType.UTILITY:
            core = self.engine_core
            core.busy_deadline_s, core.busy_since = STEP_TIMEOUT_S, time.monotonic()
            try:
                self.output_queue.put(EngineCoreOutputs(utility_output=self._call_utility(payload)))
            finally:
                core.busy_since = 0.0
        elif kind is EngineCoreRequestType.SHUTDOWN:
            return False
        else:
            raise RuntimeError(f"The engine could not read a message:\n{payload}")
        return True

    def _call_utility(self, req: UtilityRequest) -> UtilityOutput:
        try:
            if req.method.startswith("_"):
                raise AttributeError(f"{req.method!r} is private; only public EngineCore "
                                     "methods can be called.")
            result = getattr(self.engine_core, req.method)(*req.args)
            # Convert here, so a result msgspec cannot encode fails this call, not the engine.
            return UtilityOutput(req.call_id, result=msgspec.to_builtins(result))
        except Exception as e:
            return UtilityOutput(req.call_id, failure=f"{type(e).__name__}: {e}")

    def _send_dead(self, text: str) -> None:
        dead = UtilityOutput(ENGINE_DEAD_CALL_ID, failure=text)
        self.output_queue.put(EngineCoreOutputs(utility_output=dead))


def run_engine_core(child: ChildContext, input_addr: str, output_addr: str) -> int:
    """Build the EngineCore, answer the handshake with an EngineCoreReady, then serve until
    shut down. Returns 0 after SHUTDOWN or the parent's death, 1 when start-up or a step failed.
    """
    encoder = msgspec.msgpack.Encoder()
    ready = child.ready_conn
    try:
        config = decode_engine_config(child.config_bytes)
        proc = EngineCoreProc(config, input_addr, output_addr, child)
    except BaseException as e:
        logger.debug("Engine start-up failed", exc_info=True)
        ready.send_bytes(encoder.encode(EngineCoreReady(error=str(e), error_type=type(e).__name__)))
        ready.close()
        return 1
    ready.send_bytes(encoder.encode(EngineCoreReady(
        platform=config.platform, num_blocks=config.cache_config.num_blocks,
        kv_cache_memory=proc.engine_core.kv_cache_memory)))
    ready.close()
    return proc.run_busy_loop()


def main(argv: list[str]) -> None:
    """``python -m piston.engine.core_proc INPUT_ADDR OUTPUT_ADDR``, started by ChildProcess."""
    child = ChildContext.enter()
    input_addr, output_addr = argv
    exit_now(run_engine_core(child, input_addr, output_addr))


if __name__ == "__main__":
    main(sys.argv[1:])

"""EngineCoreProc: the EngineCore busy loop in its own process, fed over ZMQ.

Wire protocol (msgspec msgpack, never pickle):

- front end -> engine, on the input socket (PUSH -> PULL): two frames,
  ``[EngineCoreRequestType.value, payload]``; the payload is a list of EngineCoreRequest
  (ADD, so a batch arrives in one step), a list of request ids (ABORT), a UtilityRequest
  (UTILITY) or empty (SHUTDOWN).
- engine -> front end, on the output socket (PUSH -> PULL): one frame, an
  EngineCoreOutputs. A reply to a utility call carries ``utility_output``.
- The "engine dead" signal is an EngineCoreOutputs whose utility_output has
  ``call_id=ENGINE_DEAD_CALL_ID`` (-1) and ``failure`` = the traceback; the process then
  exits non-zero.
- Start-up handshake, over a multiprocessing pipe as raw bytes: one EngineCoreReady,
  sent after the model is loaded and the KV cache allocated, or carrying the error.

Two threads do the socket work, so encoding and sending overlap model execution.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import traceback
from typing import Any

import msgspec
import zmq

from piston.config import EngineConfig
from piston.engine.messages import (EngineCoreOutputs, EngineCoreRequest, EngineCoreRequestType,
                                    UtilityOutput, UtilityRequest)

logger = logging.getLogger(__name__)

ENGINE_DEAD_CALL_ID = -1
# How often the input thread wakes to check that the parent process is still alive.
_PARENT_POLL_MS = 1000


class EngineCoreReady(msgspec.Struct, array_like=True, omit_defaults=True):
    """The child's start-up handshake: the engine's facts, or why it could not start."""

    error: str | None = None
    error_type: str = ""  # the exception's class name, so the parent raises the same kind
    platform: str = ""
    num_blocks: int = 0


def encode_engine_config(config: EngineConfig) -> bytes:
    """The config as JSON, without hf_config (a transformers object the child reloads)."""
    mc = dataclasses.replace(config.model_config, hf_config=None)
    return msgspec.json.encode(dataclasses.replace(config, model_config=mc))


def decode_engine_config(data: bytes) -> EngineConfig:
    """The inverse of encode_engine_config; reloads hf_config from the model's files."""
    from piston.model_executor.model_loader import load_hf_config

    config = msgspec.json.decode(data, type=EngineConfig)
    load_hf_config(config.model_config)
    return config


class EngineCoreProc:
    """Runs an EngineCore; an input thread feeds it, an output thread sends its results."""

    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str,
                 parent_pid: int) -> None:
        from piston.engine.engine_core import EngineCore

        self.parent_pid = parent_pid
        self.input_queue: queue.Queue[tuple[EngineCoreRequestType, Any]] = queue.Queue()
        self.output_queue: queue.Queue[EngineCoreOutputs | None] = queue.Queue()
        self.engine_core = EngineCore(config)
        # Sockets only after a successful start-up: a failed one then leaves nothing to close.
        self.ctx = zmq.Context()
        self.input_thread = threading.Thread(target=self._input_loop, args=(input_addr,),
                                             name="EngineCoreInput", daemon=True)
        self.output_thread = threading.Thread(target=self._output_loop, args=(output_addr,),
                                              name="EngineCoreOutput", daemon=True)
        self.input_thread.start()
        self.output_thread.start()

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
                    if os.getppid() != self.parent_pid:
                        logger.warning("The front-end process died; the engine shuts down.")
                        self.input_queue.put((EngineCoreRequestType.SHUTDOWN, None))
                        return
                    continue
                type_frame, payload = sock.recv_multipart()
                kind = EngineCoreRequestType(type_frame)
                decoder = decoders.get(kind)
                self.input_queue.put((kind, decoder.decode(payload) if decoder else None))
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

    # ----- the busy loop ----------------------------------------------------------------

    def run_busy_loop(self) -> int:
        """Serve requests until SHUTDOWN or the parent dies (returns 0) or a step fails
        (sends the dead signal, returns 1)."""
        core = self.engine_core
        try:
            while True:
                # An idle engine blocks here, using no CPU, until the front end sends something.
                item = self.input_queue.get() if not core.has_unfinished_requests() else None
                while item is not None or not self.input_queue.empty():
                    if item is None:
                        item = self.input_queue.get_nowait()
                    if not self._handle(*item):
                        return 0
                    item = None
                if core.has_unfinished_requests():
                    outputs = core.step()
                    if outputs.outputs:
                        self.output_queue.put(outputs)
        except Exception:
            text = traceback.format_exc()
            logger.error("The engine core failed:\n%s", text)
            self._send_dead(text)
            return 1
        finally:
            self.output_queue.put(None)
            self.output_thread.join(timeout=10)
            core.shutdown()
            self.ctx.term()

    def _handle(self, kind: EngineCoreRequestType | None, payload: Any) -> bool:
        """Apply one front-end message; False means stop serving."""
        if kind is EngineCoreRequestType.ADD:
            for request in payload:
                self.engine_core.add_request(request)
        elif kind is EngineCoreRequestType.ABORT:
            self.engine_core.abort_requests(payload)
        elif kind is EngineCoreRequestType.UTILITY:
            self.output_queue.put(EngineCoreOutputs(utility_output=self._call_utility(payload)))
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


def run_engine_core(config_bytes: bytes, input_addr: str, output_addr: str, ready_pipe,
                    parent_pid: int) -> None:
    """Entry point of the engine process (see piston.engine.child_process).

    Builds the EngineCore, answers the handshake on ``ready_pipe`` with an
    EngineCoreReady, then serves until shut down. Exits 0 on SHUTDOWN or parent death,
    1 when start-up or a step failed.
    """
    # Ctrl-C reaches the whole process group; the front end decides, then shuts us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    encoder = msgspec.msgpack.Encoder()
    try:
        config = decode_engine_config(config_bytes)
        proc = EngineCoreProc(config, input_addr, output_addr, parent_pid)
    except BaseException as e:
        logger.debug("Engine start-up failed", exc_info=True)
        ready_pipe.send_bytes(encoder.encode(EngineCoreReady(error=str(e),
                                                             error_type=type(e).__name__)))
        ready_pipe.close()
        _exit(1)
    ready_pipe.send_bytes(encoder.encode(EngineCoreReady(
        platform=config.platform, num_blocks=config.cache_config.num_blocks)))
    ready_pipe.close()
    _exit(proc.run_busy_loop())


def _exit(code: int) -> None:
    # Skip interpreter teardown (seconds with torch loaded): everything is closed already.
    # Run the exit hooks ourselves; they release multiprocessing locks (tqdm's) and logs.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str]) -> None:
    """``python -m piston.engine.core_proc READY_FD INPUT_ADDR OUTPUT_ADDR PARENT_PID``,
    with the encoded EngineConfig in $PISTON_ENGINE_CONFIG (hex)."""
    from multiprocessing.connection import Connection

    from piston.engine.child_process import CONFIG_ENV
    from piston.logger import configure_logging

    configure_logging()
    ready_fd, input_addr, output_addr, parent_pid = argv
    config_bytes = bytes.fromhex(os.environ.pop(CONFIG_ENV))
    run_engine_core(config_bytes, input_addr, output_addr,
                    Connection(int(ready_fd), readable=False), int(parent_pid))


if __name__ == "__main__":
    main(sys.argv[1:])

"""A tensor-parallel rank's process: ``python -m piston.executor.worker_proc``.

It loads the model, answers ``ready``, then applies each broadcast command in order:
every rank runs each step (the collectives need all of them), and only rank 0 sends the
sampled tokens back. An exception is sent back as an ``error`` reply. The process exits
when told to, or when the engine process that started it dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback

import msgspec
import zmq

from piston.executor.messages import (CollectiveRpc, ExecuteModel, Ping, Shutdown, WorkerCommand,
                                      WorkerReply)

logger = logging.getLogger(__name__)

CONFIG_ENV = "PISTON_WORKER_CONFIG"
_PARENT_POLL_MS = 1000


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the engine) exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the poll loop below notices the parent's death instead


def run_worker(config_bytes: bytes, rank: int, world_size: int, bcast_addr: str, reply_addr: str,
               init_method: str, parent_pid: int) -> int:
    from piston.engine.core_proc import decode_engine_config
    from piston.executor.worker_factory import create_worker
    from piston.platforms.registry import get_platform

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(bcast_addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(reply_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(WorkerCommand)

    def reply(**fields) -> None:
        push.send(encoder.encode(WorkerReply(rank=rank, **fields)), copy=False)

    try:
        config = decode_engine_config(config_bytes)
        platform = get_platform(config.platform or None)
        worker = create_worker(config, platform, rank, world_size, init_method)
        worker.load_model()
    except BaseException:
        reply(kind="error", call_id=-1, error=traceback.format_exc())
        push.close(linger=5000)
        return 1
    reply(kind="ready")
    try:
        while True:
            if not sub.poll(_PARENT_POLL_MS):
                if os.getppid() != parent_pid:
                    logger.warning("Rank %d: the engine process died; exiting.", rank)
                    return 0
                continue
            cmd = decoder.decode(sub.recv())
            if isinstance(cmd, ExecuteModel):
                try:
                    output = worker.execute_model(cmd.scheduler_output)
                except Exception:
                    reply(kind="error", error=traceback.format_exc())
                    continue
                if rank == 0:
                    reply(kind="step", output=output)
            elif isinstance(cmd, CollectiveRpc):
                try:
                    result = worker.call(cmd.method, *cmd.args, **cmd.kwargs)
                    reply(kind="rpc", call_id=cmd.call_id, result=msgspec.to_builtins(result))
                except Exception as e:
                    reply(kind="error", call_id=cmd.call_id,
                          error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            elif isinstance(cmd, Ping):
                reply(kind="pong", call_id=cmd.seq)
            elif isinstance(cmd, Shutdown):
                return 0
    finally:
        try:
            worker.shutdown()
        except Exception:
            logger.exception("Rank %d: worker shutdown failed", rank)
        push.close(linger=1000)
        sub.close(linger=0)
        ctx.term()


def main(argv: list[str]) -> None:
    """``python -m piston.executor.worker_proc RANK WORLD BCAST_ADDR REPLY_ADDR INIT_METHOD
    PARENT_PID``, with the encoded EngineConfig in $PISTON_WORKER_CONFIG (hex)."""
    from piston.logger import configure_logging

    _die_with_parent()
    # Ctrl-C reaches the whole process group; the engine decides, then shuts us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging()
    rank, world_size, bcast_addr, reply_addr, init_method, parent_pid = argv
    config_bytes = bytes.fromhex(os.environ.pop(CONFIG_ENV))
    code = run_worker(config_bytes, int(rank), int(world_size), bcast_addr, reply_addr, init_method,
                      int(parent_pid))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])

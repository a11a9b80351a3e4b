"""A tensor-parallel rank's process: ``python -m piston.executor.worker_proc``, started by
piston.child_process like the engine process.

It loads the model, answers ``ready``, then applies each broadcast command in order:
every rank runs each step (the collectives need all of them), and only rank 0 sends the
sampled tokens back. An exception is sent back as an ``error`` reply. The process exits
when told to, or when the engine process that started it dies.
"""

from __future__ import annotations

import logging
import sys
import traceback

import msgspec
import zmq

from piston.child_process import ChildContext, exit_now
from piston.step.config_codec import decode_engine_config
from piston.step.runner_output import RequestFailedError
from piston.step.worker_messages import CollectiveRpc, ExecuteModel, Ping, Shutdown, WorkerCommand, WorkerReply

logger = logging.getLogger(__name__)

_PARENT_POLL_MS = 1000


def run_worker(child: ChildContext, rank: int, world_size: int, bcast_addr: str, reply_addr: str,
               init_method: str) -> int:
    from piston.executor.worker_factory import create_worker
    from piston.hal.registry import get_platform

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
        config = decode_engine_config(child.config_bytes)
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
                if not child.parent_alive():
                    logger.warning("Rank %d: the engine process died; exiting.", rank)
                    return 0
                continue
            cmd = decoder.decode(sub.recv())
            if isinstance(cmd, ExecuteModel):
                try:
                    output = worker.execute_model(cmd.scheduler_output)
                except RequestFailedError as e:  # every rank fails the same requests
                    reply(kind="step_failed", error=e.message, failed_req_ids=e.req_ids)
                    continue
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
    """``python -m piston.executor.worker_proc RANK WORLD BCAST_ADDR REPLY_ADDR INIT_METHOD``."""
    child = ChildContext.enter(die_with_parent=True)
    rank, world_size, bcast_addr, reply_addr, init_method = argv
    exit_now(run_worker(child, int(rank), int(world_size), bcast_addr, reply_addr, init_method))


if __name__ == "__main__":
    main(sys.argv[1:])

"""MultiprocExecutor: one process per tensor-parallel rank on this host.

Each step's SchedulerOutput is encoded once (msgspec) and published on a ZMQ PUB socket
that every rank subscribes to; only rank 0 answers with the sampled tokens. Replies come
back on one PULL socket. While it waits, the executor watches every worker process: a
worker that dies or raises fails the call with a WorkerError naming the rank, and the
other workers are shut down, so nothing hangs.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
from typing import Any

import msgspec
import zmq

from piston.child_process import ChildProcess
from piston.executor.abstract import Executor
from piston.hal.interface import Platform
from piston.step.config import EngineConfig
from piston.step.config_codec import encode_engine_config
from piston.step.runner_output import ModelRunnerOutput, RequestFailedError
from piston.step.scheduler_output import SchedulerOutput
from piston.step.worker_messages import CollectiveRpc, ExecuteModel, Ping, Shutdown, WorkerCommand, WorkerReply

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 600.0
_POLL_MS = 200


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, platform: type[Platform]) -> None:
        super().__init__(config, platform)
        start = time.perf_counter()
        self.procs: list[ChildProcess] = []
        self.ctx = zmq.Context()
        self.tmpdir = tempfile.mkdtemp(prefix="piston-workers-")
        bcast_addr, reply_addr = f"ipc://{self.tmpdir}/bcast", f"ipc://{self.tmpdir}/reply"
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)  # never drop a step
        self.pub.bind(bcast_addr)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(reply_addr)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(WorkerReply)
        self.call_id = 0
        # Bytes of the last step's broadcast (the per-step diff), for stats and benchmarks.
        self.last_broadcast_bytes = 0
        init_method = f"tcp://127.0.0.1:{free_port()}"
        config_bytes = encode_engine_config(config)
        try:
            for rank in range(self.world_size):
                self.procs.append(ChildProcess(
                    "piston.executor.worker_proc",
                    [str(rank), str(self.world_size), bcast_addr, reply_addr, init_method],
                    config_bytes, env={"PISTON_PLATFORM": platform.name}))
            self._wait_all("ready", None, _STARTUP_TIMEOUT_S)
            self._handshake()
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d worker processes (pids %s) ready in %.1f s.", self.world_size,
                    ", ".join(str(p.pid) for p in self.procs), time.perf_counter() - start)

    # ----- plumbing -----------------------------------------------------------------

    def _send(self, cmd: WorkerCommand) -> int:
        if self.dead is not None:
            raise self.dead
        data = self.encoder.encode(cmd)
        self.pub.send(data, copy=False)
        return len(data)

    def _check_procs(self) -> None:
        for rank, proc in enumerate(self.procs):
            code = proc.exitcode
            if code is not None:
                self._fail(f"Worker rank {rank} (pid {proc.pid}) died unexpectedly with exit code {code}.")

    def _fail_if_a_rank_died(self, error: str, failed_rank: int | None = None, grace_s: float = 1.0) -> None:
        """A rank that dies makes its peers' collectives fail a moment later: if one has
        died (within ``grace_s``), fail the executor naming it as the cause."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for rank, proc in enumerate(self.procs):
                code = proc.exitcode
                if code is not None and rank != failed_rank:
                    last = error.strip().splitlines()[-1] if error.strip() else ""
                    then = f"; rank {failed_rank} then failed" if failed_rank is not None else "; then"
                    self._fail(f"Worker rank {rank} (pid {proc.pid}) died unexpectedly with exit code "
                               f"{code}{then}: {last}")
            time.sleep(0.05)

    def _fail_on_error(self, msg: WorkerReply) -> None:
        self._fail_if_a_rank_died(msg.error, msg.rank)
        where = "while starting" if msg.call_id == -1 else "in a call"
        self._fail(f"Worker rank {msg.rank} failed {where}:\n{msg.error}")

    def _wait_all(self, kind: str | tuple[str, ...], call_id: int | None, timeout_s: float | None,
                  ranks: range | None = None) -> dict[int, WorkerReply]:
        """Replies of ``kind`` (one kind or several) and ``call_id`` from ``ranks``; raises
        WorkerError on any error reply or dead worker."""
        kinds = (kind,) if isinstance(kind, str) else kind
        ranks = ranks if ranks is not None else range(self.world_size)
        got: dict[int, WorkerReply] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(got) < len(ranks):
            if self.pull.poll(_POLL_MS):
                msg = self.decoder.decode(self.pull.recv())
                if msg.kind == "error":
                    self._fail_on_error(msg)
                if msg.kind in kinds and (call_id is None or msg.call_id == call_id) and msg.rank in ranks:
                    got[msg.rank] = msg
                continue
            self._check_procs()
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"Workers {sorted(set(ranks) - set(got))} did not answer {kind!r} "
                           f"within {timeout_s:.0f} s.")
        return got

    def _handshake(self) -> None:
        """Ping until every rank answers: after this no broadcast can be lost to a
        subscription still in flight (ZMQ's slow-joiner)."""
        seq, answered = 0, set()
        deadline = time.monotonic() + 60
        while len(answered) < self.world_size:
            seq += 1
            self._send(Ping(seq))
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                if self.pull.poll(20):
                    msg = self.decoder.decode(self.pull.recv())
                    if msg.kind == "error":
                        self._fail_on_error(msg)
                    if msg.kind == "pong":
                        answered.add(msg.rank)
            self._check_procs()
            if time.monotonic() > deadline:
                self._fail("Workers did not answer the start-up handshake within 60 s.")
        self.call_id = seq + 1  # later pongs of older pings are ignored by call id

    # ----- Executor ---------------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.last_broadcast_bytes = self._send(ExecuteModel(scheduler_output))
        # Rank 0 answers for every rank; the others' step_failed replies are dropped unread.
        reply = self._wait_all(("step", "step_failed"), None, None, ranks=range(1))[0]
        if reply.kind == "step_failed":
            # A rank that died makes its peers' collectives fail: that is no request's fault.
            self._fail_if_a_rank_died(reply.error)
            raise RequestFailedError(reply.failed_req_ids, reply.error)
        return reply.output

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Call ``method`` on every rank; arguments and results must be msgpack-able
        (numbers, strings, lists, dicts, msgspec structs): nothing is pickled."""
        self.call_id += 1
        self._send(CollectiveRpc(self.call_id, method, list(args), kwargs or {}))
        got = self._wait_all("rpc", self.call_id, None)
        return [got[r].result for r in range(self.world_size)]

    def shutdown(self) -> None:
        procs, self.procs = self.procs, []
        if procs and not self.pub.closed:
            try:
                self.pub.send(self.encoder.encode(Shutdown()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + 5
        for proc in procs:  # together, the ranks get 5 s to exit on their own
            proc.stop(grace_s=max(0.0, deadline - time.monotonic()))
            proc.close()
        if not self.pub.closed:
            self.pub.close(linger=0)
            self.pull.close(linger=0)
            self.ctx.term()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

"""What an executor broadcasts to its worker processes, and what they answer.

msgspec msgpack on ZMQ, never pickle. A step is one ``ExecuteModel`` carrying the
scheduler's diff (new requests in full; for running ones only new block ids and computed
counts; finished ids), sent once on a PUB socket that every rank subscribes to.
"""

from __future__ import annotations

from typing import Any

import msgspec

from piston.step.runner_output import ModelRunnerOutput
from piston.step.scheduler_output import SchedulerOutput


class ExecuteModel(msgspec.Struct, tag="x", array_like=True, gc=False):
    scheduler_output: SchedulerOutput


class CollectiveRpc(msgspec.Struct, tag="r", array_like=True):
    call_id: int
    method: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class Ping(msgspec.Struct, tag="p", array_like=True):
    """Start-up: repeated until every rank answers, so no later broadcast is lost."""

    seq: int


class Shutdown(msgspec.Struct, tag="s", array_like=True):
    pass


WorkerCommand = ExecuteModel | CollectiveRpc | Ping | Shutdown


class WorkerReply(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    rank: int
    # "ready" (model loaded), "pong", "step" (rank 0 only), "step_failed" (a step failed
    # because of ``failed_req_ids``; every rank sends it), "rpc", or "error".
    kind: str
    call_id: int = 0
    output: ModelRunnerOutput | None = None
    result: Any = None
    error: str = ""
    failed_req_ids: list[str] = []


class KVCacheReport(msgspec.Struct, frozen=True):
    """What a worker measured for the KV cache (``Worker.determine_num_kv_blocks``).

    A return value, never written into the config: under the mp and Ray executors the
    worker runs in another process, so a config it changed would change nowhere else.
    """

    num_blocks: int
    bytes_per_block: int

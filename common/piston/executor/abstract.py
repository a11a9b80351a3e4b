"""Executor: runs the model on every rank and hides how the ranks are laid out.

``uni``: one worker inside the EngineCore process. ``mp``: one process per rank on this
host, fed by a ZMQ broadcast. ``ray``: Ray actors in a placement group, which may span
nodes. The EngineCore sees the same four calls whichever it gets.
"""

from __future__ import annotations

import abc
import logging
from typing import Any

import msgspec

from piston.hal.interface import Platform
from piston.step.config import EngineConfig
from piston.step.runner_output import ModelRunnerOutput
from piston.step.scheduler_output import SchedulerOutput
from piston.step.worker_messages import KVCacheReport

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker failed (raised, or its process died); the executor is shut down."""


class Executor(abc.ABC):
    def __init__(self, config: EngineConfig, platform: type[Platform]) -> None:
        self.config = config
        self.platform = platform
        self.world_size = config.parallel_config.tensor_parallel_size
        # Set once a worker has failed: every later call raises it.
        self.dead: WorkerError | None = None

    def determine_num_kv_blocks(self) -> list[KVCacheReport]:
        """Every rank's KVCacheReport, in rank order (the engine takes the minimum)."""
        return [r if isinstance(r, KVCacheReport) else msgspec.convert(r, KVCacheReport)
                for r in self.collective_rpc("determine_num_kv_blocks")]

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", (num_blocks,))
        self.collective_rpc("warm_up")

    def _fail(self, message: str) -> None:
        """Record a worker failure, stop every worker, and raise it."""
        self.dead = WorkerError(message + " The other workers were shut down.")
        logger.error("%s", message)
        self.shutdown()
        raise self.dead

    @abc.abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Send the step to every rank; return rank 0's sampled tokens."""

    @abc.abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Call ``method`` on every worker; one result per rank, in rank order."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop every worker; idempotent."""

"""Executor: runs the model on every rank and hides how the ranks are laid out.

``uni``: one worker inside the EngineCore process. ``mp``: one process per rank on this
host, fed by a ZMQ broadcast. ``ray``: Ray actors in a placement group, which may span
nodes. The EngineCore sees the same four calls whichever it gets.
"""

from __future__ import annotations

import abc
import logging
from typing import Any

from piston.config import EngineConfig
from piston.core.scheduler_output import SchedulerOutput
from piston.platforms.interface import Platform
from piston.worker.runner_output import ModelRunnerOutput

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

    @staticmethod
    def get_class(config: EngineConfig) -> type["Executor"]:
        backend = config.parallel_config.executor_backend
        if backend == "uni":
            from piston.executor.uniproc import UniProcExecutor

            return UniProcExecutor
        if backend == "mp":
            from piston.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor
        if backend == "ray":
            from piston.executor.ray_executor import RayExecutor

            return RayExecutor
        raise ValueError(f"distributed_executor_backend={backend!r} is unknown; use uni, mp or ray.")

    def determine_num_kv_blocks(self) -> int:
        """The KV blocks every rank can hold: the minimum over ranks."""
        return min(self.collective_rpc("determine_num_kv_blocks"))

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

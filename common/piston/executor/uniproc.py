"""UniProcExecutor: one worker, in the EngineCore's own process."""

from __future__ import annotations

from typing import Any

from piston.executor.abstract import Executor
from piston.executor.worker_factory import create_worker
from piston.hal.interface import Platform
from piston.step.config import EngineConfig
from piston.step.runner_output import ModelRunnerOutput
from piston.step.scheduler_output import SchedulerOutput


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, platform: type[Platform]) -> None:
        super().__init__(config, platform)
        if self.world_size != 1:
            raise ValueError("The uni executor runs one rank; use mp or ray for tensor parallelism.")
        self.worker = create_worker(config, platform, rank=0, world_size=1)
        self.worker.load_model()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Call ``method`` on every worker (here: one) and return each result."""
        return [self.worker.call(method, *args, **(kwargs or {}))]

    def shutdown(self) -> None:
        self.worker.shutdown()

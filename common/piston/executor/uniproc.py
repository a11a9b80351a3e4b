"""UniProcExecutor: one worker, in the EngineCore's own process."""

from __future__ import annotations

from typing import Any

from piston.config import EngineConfig
from piston.core.scheduler_output import SchedulerOutput
from piston.platforms.interface import Platform
from piston.worker.runner_output import ModelRunnerOutput


class UniProcExecutor:
    def __init__(self, config: EngineConfig, platform: type[Platform]) -> None:
        self.config = config
        self.worker = platform.make_worker(config, rank=0, world_size=1)
        self.worker.load_model()

    def determine_num_kv_blocks(self) -> int:
        return self.worker.determine_num_kv_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)
        self.worker.warm_up()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Call ``method`` on every worker (here: one) and return each result."""
        return [self.worker.call(method, *args, **(kwargs or {}))]

    def shutdown(self) -> None:
        self.worker.shutdown()

"""TpuWorker: runs the JAX model runner on one TPU chip (or JAX's CPU backend)."""

from __future__ import annotations

import logging

from piston.hal.interface import Worker
from piston.step.worker_messages import KVCacheReport

from piston_tpu.model_runner import JaxModelRunner

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))

# Device memory kept free for activations and compiled programs when sizing the KV cache.
_ACTIVATION_RESERVE_FRACTION = 0.1


class TpuWorker(Worker):
    def __init__(self, config, rank: int = 0, world_size: int = 1, on_tpu: bool = False) -> None:
        super().__init__(config, rank, world_size)
        self.on_tpu = on_tpu
        self.runner = JaxModelRunner(config, on_tpu)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_kv_blocks(self) -> KVCacheReport:
        budget = self.config.cache_config.kv_cache_memory
        if budget is None:
            budget = self._free_device_memory()
        return self.kv_blocks_in(budget, self.runner.kv_cache_bytes_per_block(), self.runner.block_size)

    def _free_device_memory(self) -> int:
        """What gpu_memory_utilization of the chip leaves after the weights and a reserve."""
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        limit, used = int(stats.get("bytes_limit", 0)), int(stats.get("bytes_in_use", 0))
        if not limit:
            raise ValueError("The TPU does not report its memory; pass kv_cache_memory explicitly.")
        util = self.config.cache_config.gpu_memory_utilization
        budget = int(limit * (util - _ACTIVATION_RESERVE_FRACTION)) - used
        logger.info("TPU memory: %.2f GiB total, %.2f GiB in use; %.2f GiB for the KV cache.",
                    limit / 2**30, used / 2**30, budget / 2**30)
        return max(budget, 0)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)  # the runner keeps num_blocks for wake_up

    def warm_up(self) -> None:
        self.runner.warm_up()

    def execute_model(self, scheduler_output):
        return self.runner.execute_model(scheduler_output)

    def sleep(self, level: int = 1) -> None:
        self.runner.release_kv_cache()
        freed = self.runner.release_weights(keep_host=level == 1)
        logger.info("Asleep (level %d): released the KV cache and %.2f GB of weights%s.", level, freed / 1e9,
                    " (kept in host memory)" if level == 1 else "")

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = ["weights", "kv_cache"] if tags is None else tags
        if "weights" in tags:
            self.runner.restore_weights()
        if "kv_cache" in tags and self.runner.kv_cache is None:
            self.runner.initialize_kv_cache(self.runner.num_blocks)

    def update_weights(self, weights: list) -> int:
        return self.runner.update_weights(weights)

    def reload_weights(self) -> None:
        self.runner.reload_weights()

    def shutdown(self) -> None:
        self.runner.close()

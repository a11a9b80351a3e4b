"""A worker extension for the tensor-parallel tests (loaded by name in the workers)."""

from __future__ import annotations

import os


class RankInfo:
    """Adds ``rank_info`` to every worker, reachable through collective_rpc."""

    def rank_info(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                "num_kv_heads": self.runner.num_kv_heads}

    def echo(self, value, times: int = 1):
        return [value] * times

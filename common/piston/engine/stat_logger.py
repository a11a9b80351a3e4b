"""StatLogger: a periodic log line saying what the engine is doing and how fast."""

from __future__ import annotations

import logging
import time

from piston.step.engine_messages import EngineCoreOutputs

logger = logging.getLogger("piston.engine")


class StatLogger:
    """Counts prompt and generated tokens from engine outputs and logs throughput
    every ``interval`` seconds while there is work."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.last_log = time.monotonic()
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def record(self, outputs: EngineCoreOutputs, prompt_tokens: int = 0) -> None:
        self.prompt_tokens += prompt_tokens
        for out in outputs.outputs:
            self.generation_tokens += len(out.new_token_ids)
        now = time.monotonic()
        if now - self.last_log < self.interval:
            return
        elapsed, self.last_log = now - self.last_log, now
        stats = outputs.scheduler_stats
        if self.prompt_tokens == 0 and self.generation_tokens == 0 and (stats is None or stats.num_running == 0):
            return
        extra = ""
        if stats is not None:
            extra = (f", running: {stats.num_running} reqs, waiting: {stats.num_waiting} reqs, "
                     f"KV cache usage: {stats.kv_cache_usage:.1%}, "
                     f"prefix cache hit rate: {stats.prefix_cache_hit_rate:.1%}")
        logger.info("Avg prompt throughput: %.1f tokens/s, avg generation throughput: %.1f tokens/s%s",
                    self.prompt_tokens / elapsed, self.generation_tokens / elapsed, extra)
        self.prompt_tokens = self.generation_tokens = 0

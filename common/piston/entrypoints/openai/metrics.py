"""Prometheus metrics of one API server (a registry per app, names prefixed ``piston:``).

Counters and histograms are fed as requests finish; gauges are refreshed from the
engine's scheduler stats when /metrics is scraped.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

from piston.entrypoints.openai.request_timeline import RequestTimelineWriter
from piston.outputs import RequestOutput

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_STATS_TIMEOUT_S = 5.0

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics; ``render(engine)`` returns the Prometheus text exposition."""

    def __init__(self, model_name: str, timeline: RequestTimelineWriter | None = None) -> None:
        self.timeline = timeline
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name
        self.request_success = Counter(
            "piston:request_success", "Finished completions, by finish reason.",
            labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(
            "piston:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(
            "piston:generation_tokens", "Tokens generated.", labels, registry=r)
        self.ttft = Histogram(
            "piston:time_to_first_token_seconds", "Arrival to first generated token.",
            labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "piston:time_per_output_token_seconds", "Mean time between output tokens.",
            labels, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "piston:e2e_request_latency_seconds", "Arrival to the last token.",
            labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "piston:request_queue_time_seconds", "Time waiting before first being scheduled.",
            labels, buckets=_LATENCY_BUCKETS, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"piston:{name}", doc, labels, registry=r)

        self.running = gauge("num_requests_running", "Requests being run by the engine.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.free_blocks = gauge("num_free_kv_blocks", "KV cache blocks in the free pool.")
        self.total_blocks = gauge("num_total_kv_blocks", "KV cache blocks in all.")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Prefix cache hit rate (0-1).")
        self.preemptions = gauge("num_preemptions", "Preemptions since the engine started.")
        # Speculative decoding, since the engine started (vLLM's names; mean acceptance
        # length = 1 + accepted_tokens / drafts).
        self.spec_drafts = gauge("spec_decode_num_drafts", "Draft runs checked (one per request and step).")
        self.spec_draft_tokens = gauge("spec_decode_num_draft_tokens", "Draft tokens checked.")
        self.spec_accepted = gauge("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_accepted_per_pos = Gauge("piston:spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by position in the draft (0: first).",
                                           [*labels, "position"], registry=r)

    def observe_finished(self, out: RequestOutput) -> None:
        """Count one finished request: tokens, finish reasons and latencies."""
        if self.timeline is not None:
            self.timeline.write(out)
        name = self.model_name
        num_generated = sum(len(c.token_ids) for c in out.outputs)
        self.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(name).inc(num_generated)
        for c in out.outputs:
            self.request_success.labels(name, c.finish_reason or "unknown").inc()
        m = out.metrics or {}
        arrival, first = m.get("arrival_time"), m.get("first_token_time")
        done = m.get("finished_time")
        if arrival is not None and first is not None:
            self.ttft.labels(name).observe(max(0.0, first - arrival))
        if arrival is not None and done is not None:
            self.e2e.labels(name).observe(max(0.0, done - arrival))
        per_seq = num_generated / max(1, len(out.outputs))
        if first is not None and done is not None and per_seq > 1:
            self.tpot.labels(name).observe(max(0.0, done - first) / (per_seq - 1))
        if m.get("queue_time") is not None:
            self.queue_time.labels(name).observe(m["queue_time"])

    async def refresh_gauges(self, engine) -> None:
        """The scheduler's state as of the engine's last step (no round trip to a busy
        engine); asks the engine only before its first step. Leaves the gauges as they were
        if it does not answer."""
        name = self.model_name
        stats = engine.last_stats
        total = engine.config.cache_config.num_blocks
        if stats is None:
            try:
                stats = await asyncio.wait_for(engine.get_stats(), _STATS_TIMEOUT_S)
            except Exception as e:  # a dead or busy engine must not break /metrics
                logger.warning("Could not read engine stats for /metrics: %s", e)
                return
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.kv_cache_usage)
        self.free_blocks.labels(name).set(stats.num_free_blocks)
        self.prefix_hit_rate.labels(name).set(stats.prefix_cache_hit_rate)
        self.preemptions.labels(name).set(stats.num_preemptions)
        if engine.config.speculative_config is not None:
            self.spec_drafts.labels(name).set(stats.spec_num_drafts)
            self.spec_draft_tokens.labels(name).set(stats.spec_num_draft_tokens)
            self.spec_accepted.labels(name).set(stats.spec_num_accepted_tokens)
            for pos, n in enumerate(stats.spec_accepted_per_pos):
                self.spec_accepted_per_pos.labels(name, str(pos)).set(n)
        if total:
            self.total_blocks.labels(name).set(total)

    async def render(self, engine) -> bytes:
        await self.refresh_gauges(engine)
        return generate_latest(self.registry)

"""Scheduler: one rule, "computed catches up with total", under a token budget.

There are no prefill or decode phases. Each request has ``num_computed_tokens`` and
``num_tokens``; every step hands out at most ``max_num_batched_tokens`` tokens so the
first catches up with the second. Chunked prefill (a prompt larger than the budget),
prefix-cache hits (computed starts above zero) and resumed preemptions (computed reset
to zero, total includes output) all fall out of that rule. The decision is
``{request_id: num_tokens}``, sent to the workers as a diff (SchedulerOutput).

Out of KV blocks, the scheduler preempts by recompute: the victim's blocks are freed
and it goes back to the front of the waiting queue, to be rebuilt later.
"""

from __future__ import annotations

import sys
from typing import Iterable

from piston.config import EngineConfig
from piston.core.kv_cache_manager import KVCacheManager
from piston.core.request_queue import create_request_queue
from piston.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from piston.engine.messages import EngineCoreOutput, Logprobs, SchedulerStats
from piston.request import Request, RequestStatus
from piston.worker.runner_output import ModelRunnerOutput


def _priority_key(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class Scheduler:
    """Decides each step which requests compute how many tokens, and applies results."""

    def __init__(self, config: EngineConfig) -> None:
        cache, sched = config.cache_config, config.scheduler_config
        self.max_num_batched_tokens = sched.max_num_batched_tokens
        self.max_num_seqs = sched.max_num_seqs
        self.enable_chunked_prefill = sched.enable_chunked_prefill
        # A "module:Class" policy names a custom scheduler subclass; it starts from FCFS.
        self.policy = sched.policy if sched.policy in ("fcfs", "priority") else "fcfs"
        # 0 means "not resolved yet" (unit tests); the engine sets the real context.
        self.max_model_len = config.model_config.max_model_len or sys.maxsize
        self.kv_cache_manager = KVCacheManager(
            cache.num_blocks, cache.block_size, cache.enable_prefix_caching
        )

        self.requests: dict[str, Request] = {}
        self.waiting = create_request_queue(self.policy)
        self.running: list[Request] = []
        # Ids the workers must forget at the next step: finished, aborted or preempted.
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0

    # ---- bookkeeping -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING)."""
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """Finish requests from outside (abort): free their blocks, drop them from queues.

        Unknown or already finished ids are ignored. They produce no EngineCoreOutput;
        the caller reports them.
        """
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        running, waiting = [], []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            (running if request.status == RequestStatus.RUNNING else waiting).append(request)
            request.status = finished_status
            self._free_request(request)
        if running:
            gone = set(map(id, running))
            self.running = [r for r in self.running if id(r) not in gone]
        if waiting:
            self.waiting.remove_requests(waiting)

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def make_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage, prefix_cache_hit_rate=kv.prefix_cache_hit_rate,
            num_preemptions=self.num_preemptions,
            num_free_blocks=kv.block_pool.get_num_free_blocks())

    # ---- schedule ----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Decide this step: running requests first, then waiting ones, within the budget.

        Never exceeds ``max_num_batched_tokens`` tokens or ``max_num_seqs`` running
        requests, and never schedules a request past ``max_model_len``. On return, each
        scheduled request's ``num_computed_tokens`` already includes this step's tokens.
        """
        kv = self.kv_cache_manager
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[Request] = []
        cached_ids: list[str] = []
        cached_block_ids: list[list[int]] = []
        preempted = False

        # Serve running requests best-first, so victims (taken from the end) are never
        # ones already scheduled this step.
        if self.policy == "priority":
            self.running.sort(key=_priority_key)

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget, self.max_model_len - request.num_computed_tokens)
            if num_new <= 0 or (not self.enable_chunked_prefill and num_new < remaining):
                i += 1
                continue
            while (block_ids := kv.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if block_ids is None:
                break  # the request preempted itself: it was the last running one
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            cached_ids.append(request.request_id)
            cached_block_ids.append(block_ids)
            i += 1

        # Admitting new work right after preempting would only thrash the cache.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek()
            hit_blocks, num_hit = kv.get_computed_blocks(request)
            remaining = request.num_tokens - num_hit
            if not self.enable_chunked_prefill and remaining > budget:
                break
            num_new = min(remaining, budget, self.max_model_len - num_hit)
            if num_new <= 0 or kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
                break
            self.waiting.pop()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(request)

        output = SchedulerOutput(
            scheduled_new_reqs=[
                NewRequestData(
                    req_id=r.request_id,
                    prompt_token_ids=r.prompt_token_ids,
                    output_token_ids=list(r.output_token_ids),
                    sampling_params=r.sampling_params,
                    block_ids=kv.get_block_ids(r.request_id),
                    num_computed_tokens=r.num_computed_tokens,
                    eos_token_id=r.eos_token_id,
                )
                for r in new_reqs
            ],
            scheduled_cached_reqs=CachedRequestData(
                req_ids=cached_ids,
                new_block_ids=cached_block_ids,
                num_computed_tokens=[self.requests[r].num_computed_tokens for r in cached_ids],
            ),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            finished_req_ids=list(self.finished_req_ids),
            num_common_prefix_blocks=(
                kv.get_num_common_prefix_blocks(self.running[0], len(self.running)) if self.running else 0
            ),
        )
        self.finished_req_ids = set()
        # As vLLM V1: count the tokens as computed now; the next step builds on them.
        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n
        return output

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)
        # The workers drop its state now; it comes back as a new request on resume.
        self.finished_req_ids.add(request.request_id)

    # ---- results -----------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, apply stop rules, free finished requests.

        One EngineCoreOutput per request that sampled tokens or got prompt logprobs this
        step. Stop checks per token, in order: eos (unless ignore_eos; only once
        min_tokens are out), stop_token_ids (also after min_tokens), then max_tokens or
        max_model_len. Requests aborted meanwhile are skipped.
        """
        outputs: list[EngineCoreOutput] = []
        sampled_all = model_runner_output.sampled_token_ids
        logprobs = model_runner_output.logprobs
        prompt_logprobs = model_runner_output.prompt_logprobs
        finished: list[Request] = []
        for row, req_id in enumerate(model_runner_output.req_ids):
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            sampled = sampled_all[row]
            new_prompt_lp = prompt_logprobs.get(req_id) if prompt_logprobs else None
            if not sampled and new_prompt_lp is None:
                continue

            new_lp = None
            if sampled:
                sampled = self._append_and_check_stop(request, sampled)
                k = request.sampling_params.logprobs
                if logprobs is not None and k is not None:
                    new_lp = _slice_logprobs(logprobs, k + 1, row)
            k = request.sampling_params.prompt_logprobs
            if new_prompt_lp is not None and k is not None:
                new_prompt_lp = _slice_logprobs(new_prompt_lp, k + 1)
            outputs.append(
                EngineCoreOutput(
                    request_id=req_id,
                    new_token_ids=sampled,
                    new_logprobs=new_lp,
                    new_prompt_logprobs=new_prompt_lp,
                    finish_reason=request.get_finish_reason(),
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                )
            )
            if request.is_finished():
                finished.append(request)

        if finished:
            for request in finished:
                self._free_request(request)
            self.running = [r for r in self.running if not r.is_finished()]
        return outputs

    def _append_and_check_stop(self, request: Request, sampled: list[int]) -> list[int]:
        """Append tokens up to and including the first stop; return the appended ones."""
        params = request.sampling_params
        max_tokens = params.max_tokens
        num_out = request.num_output_tokens
        num_total = request.num_tokens
        for j, token in enumerate(sampled):
            num_out += 1
            num_total += 1
            status = None
            if num_out >= params.min_tokens:
                if not params.ignore_eos and token == request.eos_token_id:
                    status = RequestStatus.FINISHED_STOPPED
                elif params.stop_token_ids and token in params.stop_token_ids:
                    status = RequestStatus.FINISHED_STOPPED
                    request.stop_reason = token
            if status is None and (
                (max_tokens is not None and num_out >= max_tokens) or num_total >= self.max_model_len
            ):
                status = RequestStatus.FINISHED_LENGTH
            if status is not None:
                request.status = status
                if j + 1 < len(sampled):
                    sampled = sampled[: j + 1]
                break
        request.append_output_token_ids(sampled)
        return sampled


def _slice_logprobs(lp: Logprobs, width: int, row: int | None = None) -> Logprobs:
    """Keep the first ``width`` columns (chosen token + top-k), of one row or of all rows."""
    if row is not None:
        return Logprobs([lp.token_ids[row][:width]], [lp.logprobs[row][:width]], [lp.ranks[row]])
    if all(len(r) <= width for r in lp.token_ids):
        return lp
    return Logprobs([r[:width] for r in lp.token_ids], [r[:width] for r in lp.logprobs], lp.ranks)

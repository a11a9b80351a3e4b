"""Scheduler: one rule, "computed catches up with total", under a token budget.

There are no prefill or decode phases. Each request has ``num_computed_tokens`` and
``num_tokens``; every step hands out at most ``max_num_batched_tokens`` tokens so the
first catches up with the second. Chunked prefill (a prompt larger than the budget),
prefix-cache hits (computed starts above zero) and resumed preemptions (computed reset
to zero, total includes output) all fall out of that rule. The decision is
``{request_id: num_tokens}``, sent to the workers as a diff (SchedulerOutput).

Out of KV blocks, the scheduler preempts by recompute: the victim's blocks are freed
and it goes back to the waiting queue, to be rebuilt later.

Who goes first, how the budget is shared and who may be preempted is the policy's
(``piston.core.policies``: fcfs, priority, fair). ``SchedulerConfig.policy`` may also
name a ``module:Class`` subclass of ``Scheduler``. Its hooks, from small to large:

- ``make_policy(name)``: return your own ``SchedulingPolicy`` (ordering, shares,
  preemption) and keep the rest of the loop;
- ``schedule()`` / ``update_from_output()``: wrap them with ``super()`` to add
  bookkeeping, or replace them (keep the output contracts in their docstrings);
- ``add_request()`` / ``finish_requests()``: see or filter requests as they come and go.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable

from piston.core.hybrid_kv_cache_manager import make_kv_cache_manager
from piston.core.policies import SchedulingPolicy, make_policy
from piston.core.request import Request, RequestStatus
from piston.step.config import EngineConfig
from piston.step.engine_messages import EngineCoreOutput, Logprobs, SchedulerStats
from piston.step.fault_injection import maybe_fail
from piston.step.runner_output import ModelRunnerOutput
from piston.step.scheduler_output import NewRequestData, RunningRequestData, SchedulerOutput

logger = logging.getLogger(__name__)

# The most decode steps a request whose drafts keep being rejected goes without checking
# drafts (see Scheduler.schedule): a probe every 32 steps.
SPEC_MAX_SKIP = 31
# Multi-LoRA: steps the head of the waiting queue may be passed over for want of an adapter
# slot before requests of the running adapters stop going ahead of it.
LORA_MAX_SKIPPED_STEPS = 32


class Scheduler:
    """Decides each step which requests compute how many tokens, and applies results."""

    def __init__(self, config: EngineConfig) -> None:
        sched = config.scheduler_config
        self.max_num_batched_tokens = sched.max_num_batched_tokens
        self.max_num_seqs = sched.max_num_seqs
        self.enable_chunked_prefill = sched.enable_chunked_prefill
        # Catch-up tokens (prefills, recomputes) per step; None: no cap beyond the budget.
        # The cap needs chunking: without it a prompt larger than the cap would never fit.
        self.max_prefill_tokens = (sched.max_prefill_tokens or None) if self.enable_chunked_prefill else None
        self.policy = self.make_policy(sched.policy)
        # Multi-LoRA: the most distinct adapters among running requests (0: LoRA off).
        self.max_loras = config.lora_config.max_loras if config.lora_config is not None else 0
        # 0 means "not resolved yet" (unit tests); the engine sets the real context.
        self.max_model_len = config.model_config.max_model_len or sys.maxsize
        # One block table, or one per group of layers (a model mixing full and sliding layers).
        self.kv_cache_manager = make_kv_cache_manager(config)

        self.requests: dict[str, Request] = {}
        self.waiting = self.policy.make_queue()
        self.running: list[Request] = []
        # Ids the workers must forget at the next step: finished, aborted or preempted.
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        # Speculative decoding: the most drafts one request checks in a step (0: off), the
        # running-set size above which drafts are ignored, and the acceptance counters.
        spec = config.speculative_config
        self.num_spec_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.spec_disable_batch_size = (spec.disable_by_batch_size or 0) if spec is not None else 0
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted = 0
        self.spec_accepted_per_pos = [0] * self.num_spec_tokens
        # A draft model writes KV for its drafts past the step's tokens: a sampling request
        # gets that many more slots when blocks are spare (never at another's expense).
        self.num_lookahead_tokens = self.num_spec_tokens if spec is not None and spec.uses_draft_model else 0

    def make_policy(self, name: str) -> SchedulingPolicy:
        """The policy for ``SchedulerConfig.policy``; a ``module:Class`` name gets FCFS.

        Override to plug in a custom ``SchedulingPolicy``.
        """
        return make_policy(name)

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
            num_free_blocks=kv.block_pool.get_num_free_blocks(),
            spec_num_drafts=self.spec_num_drafts, spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted, spec_accepted_per_pos=list(self.spec_accepted_per_pos))

    # ---- schedule ----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Decide this step: serve running requests and admit waiting ones, within the budget.

        Running requests are served in the policy's order; between two of them the head
        of the waiting queue is admitted whenever the policy ranks it first. Admission
        stops at the first waiting request that does not fit (after any preemption the
        policy allows), and after a running request had to preempt to grow.

        Never exceeds ``max_num_batched_tokens`` tokens or ``max_num_seqs`` running
        requests, and never schedules a request past ``max_model_len``. On return, each
        scheduled request's ``num_computed_tokens`` already includes this step's tokens.

        Speculative decoding: a request with one token to go also checks the drafts it got
        from the last step (as many as the budget and its context allow); they count as
        scheduled tokens and get KV slots, and ``update_from_output`` takes the rejected
        ones back. Drafts are ignored in steps with more than ``disable_by_batch_size``
        running requests, and by a request whose last draft runs were rejected whole: after
        ``m`` such runs in a row it skips drafts for ``min(2**m - 1, SPEC_MAX_SKIP)`` decode
        steps, so drafts that never match cost a few percent, not a step's worth each time.
        """
        kv, policy = self.kv_cache_manager, self.policy
        budget = self.max_num_batched_tokens
        prefill_left = self.max_prefill_tokens or budget
        num_scheduled: dict[str, int] = {}
        new_reqs: list[Request] = []
        cached_block_ids: dict[str, list[int]] = {}
        spec_tokens: dict[str, list[int]] = {}
        speculating = self.num_spec_tokens > 0 and (
            not self.spec_disable_batch_size or len(self.running) <= self.spec_disable_batch_size)
        preempted: set[str] = set()
        admitting = True
        kv.begin_step()
        kv.release_out_of_window(self.running)  # sliding-window models: blocks behind the windows
        policy.begin_step(self.running, self.waiting, budget)

        # LoRA: the adapters of running requests, which a step may hold at most max_loras of.
        loras = {r.lora_request for r in self.running if r.lora_request is not None} if self.max_loras else None
        # The head of the queue skipped for want of an adapter slot for LORA_MAX_SKIPPED_STEPS
        # steps: only base-model requests go ahead of it from now on, so the running adapters
        # drain and free a slot (requests of busy adapters would otherwise starve it).
        lora_starving = False
        if loras is not None and self.waiting:
            first = self.waiting.peek()
            if self._lora_fits(first, loras):
                first.lora_skipped_steps = 0
            else:
                first.lora_skipped_steps += 1
                lora_starving = first.lora_skipped_steps > LORA_MAX_SKIPPED_STEPS
        i = 0  # self.running[:i] are served (or skipped) this step; victims come from the end
        while budget > 0:
            if admitting and self.waiting:
                head = self.waiting.peek() if loras is None else self._next_fitting(loras, lora_starving)
                if head is None:
                    admitting = False  # every waiting request needs an adapter beyond max_loras
                elif head.request_id in preempted:
                    admitting = False  # re-admitting a request preempted this step would thrash
                elif i >= len(self.running) or policy.waiting_first(head, self.running[i]):
                    num_new = self._admit(head, min(budget, prefill_left), i, len(new_reqs), preempted)
                    if num_new == 0:
                        admitting = False
                    else:
                        num_scheduled[head.request_id] = num_new
                        budget -= num_new
                        prefill_left -= num_new
                        new_reqs.append(head)
                        policy.on_scheduled(head, num_new, admitted=True)
                        if loras is not None and head.lora_request is not None:
                            loras.add(head.lora_request)
                    continue
            if i >= len(self.running):
                break
            request = self.running[i]
            remaining = request.num_tokens - request.num_computed_tokens
            catching_up = remaining > 1
            drafts = ()
            if speculating and remaining == 1 and request.spec_token_ids:
                if request.spec_skip_steps:
                    request.spec_skip_steps -= 1
                else:
                    drafts = request.spec_token_ids
            num_new = min(remaining + len(drafts), prefill_left if catching_up else budget, budget,
                          policy.token_limit(request), self.max_model_len - request.num_computed_tokens)
            if num_new <= 0 or (not self.enable_chunked_prefill and num_new < remaining):
                i += 1
                continue
            if drafts and num_new > remaining and self._drafts_crowd_out(request, num_new, remaining, i):
                num_new = remaining
            while (block_ids := kv.allocate_slots(request, num_new)) is None:
                if drafts and num_new > remaining:  # no room for the drafts: check none, preempt no one
                    num_new = remaining
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                admitting = False  # admitting new work right after preempting would thrash
                if victim is request:
                    break
            if block_ids is None:
                continue  # the request preempted itself: it was the last running one
            block_ids[0] += self._lookahead(request, num_new, i)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            if catching_up:
                prefill_left -= num_new
            elif num_new > 1:  # drafts that fit (the first token is the request's own)
                spec_tokens[request.request_id] = list(drafts[:num_new - 1])
            cached_block_ids[request.request_id] = block_ids
            policy.on_scheduled(request, num_new, admitted=False)
            i += 1
        self.running.extend(new_reqs)

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
                    lora_request=r.lora_request,
                )
                for r in new_reqs
            ],
            scheduled_running_reqs=RunningRequestData(
                req_ids=list(cached_block_ids),
                new_block_ids=list(cached_block_ids.values()),
                num_computed_tokens=[self.requests[r].num_computed_tokens for r in cached_block_ids],
            ),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            finished_req_ids=list(self.finished_req_ids),
            num_common_prefix_blocks=(
                kv.get_num_common_prefix_blocks(self.running[0], len(self.running)) if self.running else 0
            ),
            kv_transfer=kv.offload.take_transfer() if kv.offload is not None else None,
            scheduled_spec_decode_tokens=spec_tokens,
        )
        self.finished_req_ids = set()
        # As vLLM V1: count the tokens as computed now; the next step builds on them.
        for req_id, n in num_scheduled.items():
            request = self.requests[req_id]
            request.num_computed_tokens += n
            request.spec_token_ids = []  # checked now (or dropped); the step proposes new ones
        now = time.monotonic()
        for request in new_reqs:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        return output

    def _next_fitting(self, loras: set, starving: bool) -> Request | None:
        """The first waiting request (the head, else in the queue's pop order) whose adapter
        is among ``loras`` (the running adapters, LoRARequests: an id reused for another
        folder is another adapter) or still fits within max_loras; None if none does (with
        ``starving``: only base-model requests pass the head). A request of an
        adapter beyond the limit waits, and those behind it of other adapters go first."""
        head = self.waiting.peek()
        if self._lora_fits(head, loras):
            return head
        return next((r for r in self.waiting.in_order()
                     if (r.lora_request is None if starving else self._lora_fits(r, loras))), None)

    def _lora_fits(self, request: Request, loras: set) -> bool:
        lora = request.lora_request
        return lora is None or lora in loras or len(loras) < self.max_loras

    def _lookahead(self, request: Request, num_new: int, served: int) -> list[int]:
        """Blocks for the draft model's lookahead slots of ``request`` (scheduled ``num_new``
        tokens, not yet counted as computed), when it samples this step, no request waits
        (blocks go to admitting it first), and blocks are spare after one for each running
        request after ``running[served]``. Without them a request drafts only as far as its
        blocks reach."""
        if (not self.num_lookahead_tokens or self.waiting
                or request.num_computed_tokens + num_new < request.num_tokens):
            return []
        extra = min(self.num_lookahead_tokens, self.max_model_len - request.num_computed_tokens - num_new)
        if extra <= 0:
            return []
        keep_free = max(len(self.running) - served - 1, 0)
        return self.kv_cache_manager.allocate_lookahead(request, num_new + extra, keep_free)

    def _drafts_crowd_out(self, request: Request, num_new: int, remaining: int, served: int) -> bool:
        """Whether the blocks ``request``'s drafts would take leave too few for the running
        requests after ``running[served]`` to grow by one block each: drafts must never cost
        a preemption."""
        kv = self.kv_cache_manager
        need = kv.num_new_blocks(request, num_new)
        if need == kv.num_new_blocks(request, remaining):
            return False  # the drafts fit in blocks the request takes anyway
        after = len(self.running) - served - 1
        return need + after > kv.block_pool.get_num_free_blocks()

    def _admit(self, request: Request, budget: int, num_served: int, num_admitted: int,
               preempted: set[str]) -> int:
        """Move the waiting ``request`` to running with its first chunk; 0 if it does not fit.

        When slots or blocks run out, preempts the last running requests (never one of
        ``running[:num_served]``, which this step already served) while the policy allows.
        Victims stay preempted even if the request still does not fit: it outranks them,
        so it takes their room next step, before anything else is served.
        """
        kv = self.kv_cache_manager
        hit_blocks, num_hit = kv.get_computed_blocks(request)
        remaining = request.num_tokens - num_hit
        limit = min(budget, self.policy.token_limit(request))
        if not self.enable_chunked_prefill and remaining > limit:
            return 0
        num_new = min(remaining, limit, self.max_model_len - num_hit)
        if num_new <= 0:
            return 0
        while (len(self.running) + num_admitted >= self.max_num_seqs
               or kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None):
            if len(self.running) <= num_served or not self.policy.may_preempt(request, self.running[-1]):
                return 0
            victim = self.running.pop()
            self._preempt(victim)
            preempted.add(victim.request_id)
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit
        self._lookahead(request, num_new, num_served - 1)
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
        return num_new

    def preempt_all(self) -> int:
        """Send every running request back to the waiting queue, to be computed again (the
        engine does this before it drops the KV cache); returns how many. They keep their
        order at the front of the queue and are not counted as preemptions."""
        running, self.running = self.running, []
        for request in reversed(running):
            self._preempt(request, count=False)
        return len(running)

    def _preempt(self, request: Request, count: bool = True) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        if count:
            request.num_preemptions += 1
            self.num_preemptions += 1
        self.policy.on_preempted(request)
        self.waiting.prepend(request)
        # The workers drop its state now; it comes back as a new request on resume.
        self.finished_req_ids.add(request.request_id)

    # ---- results -----------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, apply stop rules, free finished requests.

        With speculative decoding a request may sample several tokens (its accepted drafts
        and one more): the drafts it rejected leave its computed count, and the drafts the
        step proposed for it are kept for the next step.

        One EngineCoreOutput per request that sampled tokens or got prompt logprobs this
        step. Stop checks per token, in order: eos (unless ignore_eos; only once
        min_tokens are out), stop_token_ids (also after min_tokens), then max_tokens or
        max_model_len. Requests aborted meanwhile are skipped. A request's first output
        with tokens carries its ``queue_time`` (None when the arrival time is unusable).
        """
        outputs: list[EngineCoreOutput] = []
        sampled_all = model_runner_output.sampled_token_ids
        logprobs = model_runner_output.logprobs
        prompt_logprobs = model_runner_output.prompt_logprobs
        finished: list[Request] = []
        spec_checked = scheduler_output.scheduled_spec_decode_tokens
        spec_next = model_runner_output.spec_token_ids
        lp_row = 0  # the logprobs row of this request's first new token
        for row, req_id in enumerate(model_runner_output.req_ids):
            sampled = sampled_all[row]
            first_lp_row, lp_row = lp_row, lp_row + len(sampled)
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            try:
                maybe_fail("scheduler", req_id)
                if spec_checked or spec_next:
                    self._apply_spec(request, sampled, spec_checked.get(req_id, ()),
                                     spec_next[row] if spec_next else ())
                output = self._apply_output(request, first_lp_row, sampled, logprobs, prompt_logprobs)
            except Exception as e:  # this request's bookkeeping failed: fail it alone
                logger.exception("Request %s failed while applying its step output", req_id)
                outputs.append(self._fail_request(request, f"applying the step's output failed: "
                                                            f"{type(e).__name__}: {e}"))
                finished.append(request)
                continue
            if output is not None:
                outputs.append(output)
                if request.is_finished():
                    finished.append(request)

        if finished:
            for request in finished:
                self._free_request(request)
            self.running = [r for r in self.running if not r.is_finished()]
        return outputs

    def _apply_spec(self, request: Request, sampled: list[int], checked: list[int] | tuple,
                    proposed: list[int] | tuple) -> None:
        """Count the drafts ``checked`` this step, take the rejected ones back from the
        computed tokens (their KV slots are written over later), and keep the drafts
        ``proposed`` for the next step: at most as many as the request's max_tokens and
        context leave room for after its next token."""
        if checked:
            num_accepted = max(len(sampled) - 1, 0)
            request.num_computed_tokens -= len(checked) - num_accepted
            request.spec_misses = 0 if num_accepted else request.spec_misses + 1
            request.spec_skip_steps = min(2 ** min(request.spec_misses, 16) - 1, SPEC_MAX_SKIP)
            self.spec_num_drafts += 1
            self.spec_num_draft_tokens += len(checked)
            self.spec_num_accepted += num_accepted
            for pos in range(min(num_accepted, len(self.spec_accepted_per_pos))):
                self.spec_accepted_per_pos[pos] += 1
        if proposed:
            max_tokens = request.sampling_params.max_tokens
            room = self.max_model_len - request.num_tokens - len(sampled)
            if max_tokens is not None:
                room = min(room, max_tokens - request.num_output_tokens - len(sampled) - 1)
            request.spec_token_ids = list(proposed[:max(room, 0)])

    def _apply_output(self, request: Request, row: int, sampled: list[int], logprobs: Logprobs | None,
                      prompt_logprobs: dict[str, Logprobs] | None) -> EngineCoreOutput | None:
        """One request's share of a step's result: append its tokens, check stops, slice its
        logprobs (``row``: the logprobs row of its first new token); None when the step
        produced nothing for it."""
        req_id = request.request_id
        new_prompt_lp = prompt_logprobs.get(req_id) if prompt_logprobs else None
        if not sampled and new_prompt_lp is None:
            return None
        new_lp = None
        queue_time = engine_times = None
        if sampled:
            if request.num_output_tokens == 0:
                queue_time = _queue_time(request)
                engine_times = (request.received_time, request.added_time, request.first_scheduled_time or 0.0,
                                time.monotonic())
            sampled = self._append_and_check_stop(request, sampled)
            k = request.sampling_params.logprobs
            if logprobs is not None and k is not None:
                new_lp = _slice_logprobs(logprobs, k + 1, row, len(sampled))
        k = request.sampling_params.prompt_logprobs
        if new_prompt_lp is not None and k is not None:
            new_prompt_lp = _slice_logprobs(new_prompt_lp, k + 1)
        return EngineCoreOutput(
            request_id=req_id,
            new_token_ids=sampled,
            new_logprobs=new_lp,
            new_prompt_logprobs=new_prompt_lp,
            finish_reason=request.get_finish_reason(),
            stop_reason=request.stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            queue_time=queue_time,
            engine_times=engine_times,
        )

    # ----- faults -------------------------------------------------------------------

    def _fail_request(self, request: Request, message: str) -> EngineCoreOutput:
        """Mark ``request`` failed (the caller frees it) and say so to the front end."""
        request.status = RequestStatus.FINISHED_ERROR
        request.error = message
        return EngineCoreOutput(request_id=request.request_id, new_token_ids=[], finish_reason="error",
                                num_cached_tokens=max(request.num_cached_tokens, 0), error=message)

    def fail_step(self, scheduler_output: SchedulerOutput, failed_req_ids: Iterable[str],
                  message: str) -> list[EngineCoreOutput]:
        """The step ``scheduler_output`` failed because of ``failed_req_ids``: fail those,
        and send the step's other requests back to the waiting queue to be computed again.

        The step's KV was not (or not all) written, so every block it registered in the
        prefix cache is taken back, and every request it scheduled leaves the workers and
        comes back as a new one. Returns one error output per failed request.
        """
        failed = set(failed_req_ids)
        self.kv_cache_manager.uncache_step()
        scheduled = [self.requests[r] for r in scheduler_output.num_scheduled_tokens
                     if r in self.requests and not self.requests[r].is_finished()]
        gone = set(map(id, scheduled))
        self.running = [r for r in self.running if id(r) not in gone]
        outputs = []
        # Reversed, so the requeued ones keep their order at the front of the queue.
        for request in reversed(scheduled):
            if request.request_id in failed:
                logger.error("Request %s failed: %s", request.request_id, message)
                outputs.append(self._fail_request(request, message))
                self._free_request(request)
            else:
                self._preempt(request, count=False)
        return outputs[::-1]

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


def _queue_time(request: Request) -> float | None:
    """Seconds from arrival to first scheduling; None when the arrival time is unusable."""
    start, arrival = request.first_scheduled_time, request.arrival_time
    if start is None or arrival <= 0 or arrival > start:
        return None
    return start - arrival


def _slice_logprobs(lp: Logprobs, width: int, row: int | None = None, num_rows: int = 1) -> Logprobs:
    """Keep the first ``width`` columns (chosen token + top-k), of ``num_rows`` rows from
    ``row`` or of all rows."""
    if row is not None:
        rows = range(row, row + num_rows)
        return Logprobs([lp.token_ids[r][:width] for r in rows], [lp.logprobs[r][:width] for r in rows],
                        [lp.ranks[r] for r in rows])
    if all(len(r) <= width for r in lp.token_ids):
        return lp
    return Logprobs([r[:width] for r in lp.token_ids], [r[:width] for r in lp.logprobs], lp.ranks)

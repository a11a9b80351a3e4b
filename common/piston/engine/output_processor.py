"""OutputProcessor: turns EngineCore outputs into RequestOutputs on the front end.

It detokenizes incrementally, applies stop strings (asking the engine to abort the
request), converts logprobs, and merges the ``n`` child requests of one user request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from piston.engine.detokenizer import IncrementalDetokenizer, decode_token
from piston.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from piston.step.engine_messages import EngineCoreOutput, Logprobs
from piston.step.fault_injection import maybe_fail
from piston.step.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineRequestError(RuntimeError):
    """One request failed (in the engine or while its output was processed); the others
    and the engine are fine."""


@dataclass
class ChildState:
    """One generated sequence (one engine request)."""

    engine_id: str
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestState:
    """One user request and its ``n`` children."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[ChildState]
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_cached_tokens: int = 0
    num_finished: int = 0
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why the request failed, if it did

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.children)


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{index}_{request_id}"


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.child_to_parent: dict[str, tuple[RequestState, ChildState]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    child_params: list[SamplingParams], arrival_time: float | None = None,
                    received_time: float | None = None) -> list[str]:
        """Register a request; returns the engine ids of its children.

        ``arrival_time``: when it went to the engine (after tokenization); ``received_time``:
        when the server got it, if earlier (time.monotonic both)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        n = len(child_params)
        want_prompt_lp = child_params[0].prompt_logprobs is not None
        state = RequestState(request_id, prompt, prompt_token_ids, [],
                             [None] if want_prompt_lp else None)
        state.metrics["arrival_time"] = time.monotonic() if arrival_time is None else arrival_time
        state.metrics["queue_time"] = None
        if received_time is not None:
            state.metrics["received_time"] = received_time
        for i, params in enumerate(child_params):
            child = ChildState(child_request_id(request_id, i, n), i, params,
                               IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
                               [] if params.logprobs is not None else None,
                               0.0 if params.logprobs is not None else None)
            state.children.append(child)
            self.child_to_parent[child.engine_id] = (state, child)
        self.requests[request_id] = state
        return [c.engine_id for c in state.children]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _is_stop_token(self, params: SamplingParams, token_id: int) -> bool:
        if params.stop_token_ids and token_id in params.stop_token_ids:
            return True
        return not params.ignore_eos and token_id == self.tokenizer.eos_token_id

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns the engine ids still to abort in the engine."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        ids = []
        for child in state.children:
            self.child_to_parent.pop(child.engine_id, None)
            if child.finish_reason is None:
                ids.append(child.engine_id)
        return ids

    def process_outputs(self, outputs: list[EngineCoreOutput], final_only: bool = False,
                        received_time: float | None = None) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs. Returns (request outputs, engine ids to abort).

        ``received_time``: when the front end got them from the engine (time.monotonic),
        kept in a request's metrics with its first token.

        An output whose processing raises fails its request alone: the request finishes
        with ``error`` set (and its other children are aborted); the others go on.
        """
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self.child_to_parent.get(out.request_id)
            if entry is None:
                continue  # aborted by the user meanwhile
            state, child = entry
            try:
                maybe_fail("output", out.request_id)
                if out.error is not None:
                    raise EngineRequestError(out.error)
                self._apply(state, child, out, to_abort, received_time)
            except Exception as e:
                if not isinstance(e, EngineRequestError):
                    logger.exception("Processing the output of request %s failed", out.request_id)
                    e = EngineRequestError(f"processing the request's output failed: {type(e).__name__}: {e}")
                self._fail(state, str(e), to_abort, engine_failed=out.request_id if out.error else None)
            touched[state.request_id] = state

        results = []
        for state in touched.values():
            if state.finished:
                state.metrics["finished_time"] = time.monotonic()
                self.requests.pop(state.request_id, None)
            elif final_only:
                continue
            results.append(self._make_output(state))
        return results, to_abort

    def _apply(self, state: RequestState, child: ChildState, out: EngineCoreOutput, to_abort: list[str],
               received_time: float | None = None) -> None:
        state.num_cached_tokens = out.num_cached_tokens
        metrics = state.metrics
        if out.queue_time is not None and metrics["queue_time"] is None:
            metrics["queue_time"] = out.queue_time
        first_token = bool(out.new_token_ids) and "first_token_time" not in metrics
        if first_token:
            if out.engine_times is not None:
                (metrics["engine_received_time"], metrics["engine_queued_time"], metrics["scheduled_time"],
                 metrics["first_token_engine_time"]) = out.engine_times
            if received_time is not None:
                metrics["first_output_received_time"] = received_time
        if out.new_prompt_logprobs is not None and state.prompt_logprobs is not None \
                and child.index == 0:
            state.prompt_logprobs.extend(self._convert_logprobs(out.new_prompt_logprobs))
        if out.new_token_ids:
            # Ended on a stop token (eos or a stop_token_id), whose text is left out; a request
            # whose grammar completed ends on an ordinary token.
            stop_terminated = (out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
                               and self._is_stop_token(child.params, out.new_token_ids[-1]))
            stop_str = child.detokenizer.update(out.new_token_ids, stop_terminated)
            if child.logprobs is not None and out.new_logprobs is not None:
                converted = self._convert_logprobs(out.new_logprobs)
                child.logprobs.extend(converted)
                for tok, pos in zip(out.new_token_ids, converted):
                    child.cumulative_logprob += pos[tok].logprob
            if first_token:  # detokenized: ready for the client
                metrics["first_token_time"] = time.monotonic()
            if stop_str is not None and out.finish_reason is None:
                out_reason, out_stop = "stop", stop_str
                to_abort.append(child.engine_id)
            else:
                out_reason, out_stop = out.finish_reason, out.stop_reason
        else:
            out_reason, out_stop = out.finish_reason, out.stop_reason
        if out_reason is not None and child.finish_reason is None:
            child.finish_reason, child.stop_reason = out_reason, out_stop
            state.num_finished += 1
            self.child_to_parent.pop(child.engine_id, None)

    def _fail(self, state: RequestState, message: str, to_abort: list[str], engine_failed: str | None) -> None:
        """Finish every child of ``state`` with an error; abort those the engine still runs
        (all but ``engine_failed``, which the engine already finished)."""
        state.error = state.error or message
        for child in state.children:
            if child.finish_reason is None:
                child.finish_reason = "error"
                state.num_finished += 1
                if child.engine_id != engine_failed:
                    to_abort.append(child.engine_id)
            self.child_to_parent.pop(child.engine_id, None)

    def _make_output(self, state: RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=c.index, text=c.detokenizer.output_text,
                token_ids=list(c.detokenizer.token_ids),
                cumulative_logprob=c.cumulative_logprob,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in state.children]
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, outputs=completions,
            finished=state.finished,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs is not None else None,
            num_cached_tokens=max(state.num_cached_tokens, 0), metrics=dict(state.metrics), error=state.error)

    def _convert_logprobs(self, lp: Logprobs) -> list[PositionLogprobs]:
        result = []
        for ids, values, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            pos: PositionLogprobs = {}
            for j, (tok, value) in enumerate(zip(ids[1:], values[1:])):
                pos[tok] = Logprob(value, j + 1, decode_token(self.tokenizer, tok))
            if ids[0] not in pos:
                pos[ids[0]] = Logprob(values[0], rank, decode_token(self.tokenizer, ids[0]))
            result.append(pos)
        return result

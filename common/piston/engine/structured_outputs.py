"""The EngineCore's side of structured outputs: constrained requests between the scheduler
and their grammars (piston.structured_output).

A constrained request waits here, outside the scheduler, while its grammar compiles; it
enters the scheduler when the grammar is ready (or fails alone if it cannot compile). Each
step, the requests that sample get their grammar's bitmask in the SchedulerOutput; after
the step, their matchers advance over the accepted tokens, and a request whose grammar
is complete finishes with "stop".
"""

from __future__ import annotations

import logging

from piston.core.request import Request, RequestStatus
from piston.core.scheduler import Scheduler
from piston.step.config import EngineConfig
from piston.step.engine_messages import INVALID_REQUEST_ERROR, EngineCoreOutput
from piston.step.scheduler_output import SchedulerOutput
from piston.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class StructuredOutputs:
    def __init__(self, config: EngineConfig) -> None:
        mc = config.model_config

        def load_tokenizer():
            from piston.tokenizer import load_tokenizer

            return load_tokenizer(mc.path, mc.tokenizer)

        self.manager = StructuredOutputManager(config.structured_outputs_config.backend, mc.vocab_size,
                                               load_tokenizer)
        self.waiting: dict[str, Request] = {}  # grammar still compiling

    def add(self, request: Request) -> bool:
        """Take a constrained request (True); False for an unconstrained one."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return False
        self.manager.submit(request.request_id, params)
        self.waiting[request.request_id] = request
        return True

    def admit_ready(self, scheduler: Scheduler) -> list[EngineCoreOutput]:
        """Move requests whose grammar is ready into the scheduler; error outputs for those
        whose grammar failed to compile. Waits briefly when nothing else could run."""
        if not scheduler.has_unfinished_requests():
            self.manager.wait_any(timeout=0.05)
        failed = []
        for req_id, request in list(self.waiting.items()):
            state = self.manager.ready(req_id)
            if state is False:
                continue
            del self.waiting[req_id]
            if state is True:
                scheduler.add_request(request)
            else:
                self.manager.free(req_id)
                failed.append(EngineCoreOutput(request_id=req_id, new_token_ids=[], finish_reason="error",
                                               error=f"the request's grammar cannot be used: {state}"))
        return failed

    def attach_bitmask(self, scheduler_output: SchedulerOutput, scheduler: Scheduler) -> None:
        """Put the bitmasks of this step's constrained, sampling requests into the output."""
        if not self.manager.matchers:
            return
        requests = scheduler.requests
        sampling = [r for r in scheduler_output.num_scheduled_tokens
                    if r in self.manager.matchers and requests[r].num_computed_tokens >= requests[r].num_tokens]
        ids, mask = self.manager.bitmask(sampling)
        if ids:
            scheduler_output.grammar_req_ids = ids
            scheduler_output.grammar_bitmask = mask.tobytes()

    def advance(self, outputs: list[EngineCoreOutput], scheduler: Scheduler) -> None:
        """Feed each constrained request's new tokens to its matcher; finish the request when
        its grammar is complete, fail it if the grammar rejects a token (unless the grammar
        could have stopped: then it ends there)."""
        matchers = self.manager.matchers
        if not matchers:
            return
        for out in outputs:
            req_id = out.request_id
            if req_id not in matchers:
                continue
            if out.new_token_ids and out.finish_reason is None:
                if not self.manager.accept(req_id, out.new_token_ids):
                    if matchers[req_id].can_stop():
                        # A complete grammar allows only its stop token, and something else
                        # (min_tokens) banned it, so nothing was allowed. The grammar wins: the
                        # request ends here, without the token sampled from an empty set.
                        out.new_token_ids, out.new_logprobs = [], None
                        out.finish_reason = "stop"
                        scheduler.finish_requests(req_id, RequestStatus.FINISHED_STOPPED)
                    else:  # the mask allowed nothing: a dead end of the grammar over this vocabulary
                        out.finish_reason = "error"
                        out.error = (f"{INVALID_REQUEST_ERROR}structured_outputs: after "
                                     f"{len(scheduler.requests[req_id].output_token_ids) - 1} tokens the constraint "
                                     f"allows no next token: the {self.manager.backend.name} grammar engine cannot "
                                     "produce the text it requires with this model's vocabulary")
                        scheduler.finish_requests(req_id, RequestStatus.FINISHED_ERROR)
                elif matchers[req_id].is_terminated():
                    out.finish_reason = "stop"
                    scheduler.finish_requests(req_id, RequestStatus.FINISHED_STOPPED)
            if out.finish_reason is not None:
                self.manager.free(req_id)

    def abort(self, request_ids: list[str]) -> None:
        for req_id in request_ids:
            self.waiting.pop(req_id, None)
            self.manager.free(req_id)

    def shutdown(self) -> None:
        self.manager.shutdown()

"""Request: the EngineCore's record of one sequence being generated."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from piston.step.sampling_params import SamplingParams

if TYPE_CHECKING:
    from piston.step.engine_messages import EngineCoreRequest
    from piston.step.lora_request import LoRARequest


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # this request failed; the engine runs on

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A request inside the EngineCore.

    The scheduler's whole view of progress is two numbers: ``num_computed_tokens`` and
    ``num_tokens`` (prompt plus output so far). Each step it schedules tokens so that the
    first catches up with the second.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        client_id: str | None = None,
        lora_request: "LoRARequest | None" = None,
    ) -> None:
        self.request_id = request_id
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.client_id = client_id
        self.lora_request = lora_request
        # What the prefix cache keys this request's blocks by besides their tokens.
        self.block_hash_extra_keys = lora_request.cache_key if lora_request is not None else None
        # Steps in a row this request headed the waiting queue but found no free adapter slot.
        self.lora_skipped_steps = 0
        # When the scheduler first ran it (for queue-time metrics); None while queued.
        self.first_scheduled_time: float | None = None
        # When the engine process read it off the socket, and when the busy loop (between
        # two steps) handed it to the scheduler; 0.0: not known.
        self.received_time = self.added_time = 0.0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # what failed, with FINISHED_ERROR

        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt tokens found in the prefix cache on first scheduling (reported in usage).
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # Chained hashes of this request's full blocks, filled in by the KV cache manager.
        self.block_hashes: list[int] = []
        # Speculative decoding: tokens a proposer drafted after the last one, to be checked
        # by the target model in the next step this request is scheduled for.
        self.spec_token_ids: list[int] = []
        # Draft runs in a row that had no draft accepted, and the decode steps left before
        # drafts are checked again (backing off from a request whose drafts keep missing).
        self.spec_misses = 0
        self.spec_skip_steps = 0

    @classmethod
    def from_engine_core_request(cls, req: "EngineCoreRequest") -> "Request":
        request = cls(
            req.request_id,
            req.prompt_token_ids,
            req.sampling_params,
            eos_token_id=req.eos_token_id,
            arrival_time=req.arrival_time or None,
            priority=req.priority,
            client_id=req.client_id,
            lora_request=req.lora_request,
        )
        request.added_time = time.monotonic()
        request.received_time = req.received_time or request.added_time
        return request

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        """Maximum number of output tokens (resolved against the context by the engine)."""
        return self.sampling_params.max_tokens  # type: ignore[return-value]

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return self.status.finished

    def get_finish_reason(self) -> str | None:
        return self.status.finish_reason

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )

"""Messages between the front end and the EngineCore process (msgspec structs, never pickle).

Wire protocol, over ZMQ (see piston.engine.core_proc):

- front end -> engine (PUSH -> PULL): two frames, ``[EngineCoreRequestType.value, payload]``;
  the payload is a list of EngineCoreRequest (ADD, so a batch arrives in one step), a list
  of request ids (ABORT), a UtilityRequest (UTILITY) or empty (SHUTDOWN).
- engine -> front end (PUSH -> PULL): one frame, an EngineCoreOutputs. A reply to a utility
  call carries ``utility_output``. The "engine dead" signal is a utility output with
  ``call_id=ENGINE_DEAD_CALL_ID`` and the traceback as ``failure``.
- start-up, over a pipe: one EngineCoreReady, after the model is loaded and the KV cache
  allocated, or carrying the error.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from piston.step.lora_request import LoRARequest
from piston.step.runner_output import Logprobs
from piston.step.sampling_params import SamplingParams

ENGINE_DEAD_CALL_ID = -1


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What the front end sends the EngineCore to start a request (already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    priority: int = 0
    # Who sent it (the API's `user` field or the API key): the fair policy shares by it.
    client_id: str | None = None
    # When the engine process's input thread read it (time.monotonic; set there, not sent).
    received_time: float = 0.0
    # The LoRA adapter it runs with; None: the base model.
    lora_request: LoRARequest | None = None


# Starts EngineCoreOutput.error when the request's own parameters caused the failure, found
# only while it ran (a constraint the vocabulary cannot satisfy): the server answers 400.
INVALID_REQUEST_ERROR = "invalid request: "


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Logprobs | None = None
    new_prompt_logprobs: Logprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Seconds between the core receiving the request and first scheduling it; set on
    # the request's first output only.
    queue_time: float | None = None
    # On the request's first output with tokens: when the engine process received it, the
    # busy loop queued it, the scheduler first scheduled it, and its first token was out
    # (time.monotonic, one clock for every process of the machine): the engine's part of
    # the request's timeline (piston.entrypoints.openai.request_timeline).
    engine_times: tuple[float, float, float, float] | None = None
    # With finish_reason "error": what failed. The request alone failed; the engine runs on.
    error: str | None = None


class SchedulerStats(msgspec.Struct, array_like=True, gc=False):
    """The scheduler's state after a step, for metrics and logs."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    num_preemptions: int = 0
    num_free_blocks: int = 0
    # Speculative decoding since the engine started: requests' draft runs checked, tokens
    # drafted, drafts accepted, and accepted drafts by position (index 0: first draft).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = []


class UtilityRequest(msgspec.Struct, array_like=True, gc=False):
    """Call ``EngineCore.<method>(*args)`` in the engine process; the reply carries call_id."""

    call_id: int
    method: str
    args: list = []


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    call_id: int
    result: Any = None  # any msgspec-encodable value
    failure: str | None = None  # the exception text when the call raised


class Heartbeat(msgspec.Struct, array_like=True, gc=False):
    """Sent by the engine process every second from a thread of its own, so the front end
    can tell a busy engine (a long step, still within its deadline) from a dead or wedged
    one. Times are CLOCK_MONOTONIC seconds, which every process on the host shares."""

    sent_at: float
    # When the step that is running began (0.0 while the engine is idle between steps).
    step_started_at: float = 0.0
    # How long that step may take before the engine counts as wedged (scales with its size).
    step_deadline_s: float = 0.0
    num_steps: int = 0
    # The scheduler's state after the last step or the last message the engine handled.
    scheduler_stats: SchedulerStats | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    # Set on the reply to a utility call instead of outputs.
    utility_output: UtilityOutput | None = None
    heartbeat: Heartbeat | None = None


class EngineCoreRequestType(enum.Enum):
    """The first frame of every front end -> engine message names its type."""

    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"
    SHUTDOWN = b"\x03"


class EngineCoreReady(msgspec.Struct, array_like=True, omit_defaults=True):
    """The engine process's start-up handshake: the facts it decided, or why it could not start."""

    error: str | None = None
    error_type: str = ""  # the exception's class name, so the parent raises the same kind
    platform: str = ""
    num_blocks: int = 0
    kv_cache_memory: int = 0  # bytes the KV cache takes on each rank

"""Messages between the front end and the EngineCore (msgspec structs, never pickle)."""

from __future__ import annotations

import msgspec

from piston.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What the front end sends the EngineCore to start a request (already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    priority: int = 0


class Logprobs(msgspec.Struct, array_like=True, gc=False):
    """Top-k logprobs for a run of positions.

    Row i describes one position: ``token_ids[i][0]`` is the chosen (sampled or prompt)
    token and ``token_ids[i][1:]`` the k most likely tokens, with matching ``logprobs``.
    ``ranks[i]`` is the chosen token's rank (1 = most likely).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Logprobs | None = None
    new_prompt_logprobs: Logprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    finished_requests: list[str] = []

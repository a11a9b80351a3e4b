"""What a worker returns for one step: sampled token ids and logprobs."""

from __future__ import annotations

import msgspec


class Logprobs(msgspec.Struct, array_like=True, gc=False):
    """Top-k logprobs for a run of positions.

    Row i describes one position: ``token_ids[i][0]`` is the chosen (sampled or prompt)
    token and ``token_ids[i][1:]`` the k most likely tokens, with matching ``logprobs``.
    ``ranks[i]`` is the chosen token's rank (1 = most likely).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    # Order of the requests in this output (the runner's batch order).
    req_ids: list[str]
    # One list per request: the sampled token (with speculative decoding: the accepted
    # drafts and one more), or empty when the request only advanced a prompt chunk.
    sampled_token_ids: list[list[int]]
    # One row per sampled token, in the order of sampled_token_ids flattened (without
    # speculation, row i belongs to req_ids[i]); None when no request asked. Rows carry the
    # batch's largest k; the scheduler trims each to its request's own k.
    logprobs: Logprobs | None = None
    # Prompt logprobs computed this step, per request that asked for them.
    prompt_logprobs: dict[str, Logprobs] = {}
    # Speculative decoding: per request (as req_ids), the tokens drafted to follow its new
    # ones, for the scheduler to schedule next; empty when the step proposed none.
    spec_token_ids: list[list[int]] = []


EMPTY_MODEL_RUNNER_OUTPUT = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])


class RequestFailedError(RuntimeError):
    """A step failed because of some of its requests, not because the engine is broken.

    Raised by a model runner (and carried back by every executor) naming the requests to
    fail; the EngineCore fails those alone, recomputes the step's other requests, and runs
    on. Any other exception from a step is a fault the engine cannot continue after.
    """

    def __init__(self, req_ids: list[str], message: str) -> None:
        super().__init__(message)
        self.req_ids = list(req_ids)
        self.message = message


"""ModelRunnerOutput: what a worker returns for one step."""

from __future__ import annotations

import msgspec

from piston.engine.messages import Logprobs


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    # Order of the requests in this output (the runner's batch order).
    req_ids: list[str]
    # One list per request: the sampled token, or empty when the request only
    # advanced a prompt chunk this step.
    sampled_token_ids: list[list[int]]
    # Row i of each matrix belongs to req_ids[i]; None when no request asked.
    logprobs: Logprobs | None = None
    # Prompt logprobs computed this step, per request that asked for them.
    prompt_logprobs: dict[str, Logprobs] = {}


EMPTY_MODEL_RUNNER_OUTPUT = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])

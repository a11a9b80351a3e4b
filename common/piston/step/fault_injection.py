"""Test-only fault injection: make one chosen request fail at one named stage.

``PISTON_INJECT_FAULT="<stage>:<id>[,<stage>:<id>...]"`` (read once per process) makes
``maybe_fail(stage, request_id)`` raise InjectedFault for every request whose id contains
``<id>`` (a server request id carries the client's ``X-Request-Id``). Stages:

- ``runner``: the model runner's step, in the worker, before the forward pass;
- ``sampler``: the model runner's sampling, after the forward pass;
- ``scheduler``: the EngineCore applying a step's result to the request;
- ``output``: the front end turning the request's output into text;
- ``stall``: not a failure: the step that first schedules the request sleeps
  ``PISTON_INJECT_STALL_S`` seconds (default 6) before its forward pass, as a very long
  step would.

Nothing happens without the variable; the check is one dict lookup per stage and step.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Iterable

ENV = "PISTON_INJECT_FAULT"
STALL_ENV = "PISTON_INJECT_STALL_S"
STAGES = ("runner", "sampler", "scheduler", "output", "stall")


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


@functools.lru_cache(maxsize=1)
def _faults() -> dict[str, tuple[str, ...]]:
    faults: dict[str, list[str]] = {}
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        stage, _, needle = item.partition(":")
        if stage not in STAGES or not needle:
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected <stage>:<request id> with a stage "
                             f"in {STAGES}.")
        faults.setdefault(stage, []).append(needle)
    return {stage: tuple(needles) for stage, needles in faults.items()}


def faulty(stage: str, request_ids: Iterable[str]) -> list[str]:
    """The ids in ``request_ids`` that should fail at ``stage``."""
    needles = _faults().get(stage)
    if not needles:
        return []
    return [r for r in request_ids if any(n in r for n in needles)]


def maybe_fail(stage: str, request_id: str) -> None:
    """Raise InjectedFault when ``request_id`` should fail at ``stage``."""
    if faulty(stage, (request_id,)):
        raise InjectedFault(f"injected fault at stage {stage!r} for request {request_id!r}")


def maybe_stall(request_ids: Iterable[str]) -> None:
    """Sleep ``PISTON_INJECT_STALL_S`` seconds when one of ``request_ids`` should stall."""
    if faulty("stall", request_ids):
        time.sleep(float(os.environ.get(STALL_ENV, 6.0)))

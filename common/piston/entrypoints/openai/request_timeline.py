"""The request timeline: where one request's time to first token goes, stage by stage.

With ``piston serve --request-timeline-file PATH`` the server appends one JSON line per
finished request: its id, token counts, and the time.monotonic() second at which it
passed each point below. That clock is shared by every process of a machine (the
engine's stamps travel back with the request's first output), so a client on the same
machine can add its own send and receive times (``piston bench serve --output-json``
records them per request) and ``benchmarks/request_timeline.py`` lays the whole path out.

Points, in order (a stage is the time between two neighbours):

- ``received_time``: the HTTP handler has the parsed request;
- ``arrival_time``: tokenized and checked, sent to the engine;
- ``engine_received_time``: the engine process's input thread read it;
- ``engine_queued_time``: the busy loop handed it to the scheduler (between two steps);
- ``scheduled_time``: the scheduler gave it its first tokens (the step that holds its
  prefill, or its first chunk, starts);
- ``first_token_engine_time``: the step that sampled its first token ended;
- ``first_output_received_time``: the front end got that step's outputs;
- ``first_token_time``: the first token is detokenized;
- ``first_chunk_time``: its first streamed chunk goes to the HTTP server to be written
  (streams only).
"""

from __future__ import annotations

import json
import logging
from typing import IO

from piston.outputs import RequestOutput

logger = logging.getLogger(__name__)

POINTS = ("received_time", "arrival_time", "engine_received_time", "engine_queued_time", "scheduled_time",
          "first_token_engine_time", "first_output_received_time", "first_token_time", "first_chunk_time")

# (name, from point, to point): the stages between neighbouring points.
STAGES = (
    ("parse and tokenize", "received_time", "arrival_time"),
    ("send to the engine", "arrival_time", "engine_received_time"),
    ("wait for the running step", "engine_received_time", "engine_queued_time"),
    ("wait in the queue", "engine_queued_time", "scheduled_time"),
    ("prefill steps", "scheduled_time", "first_token_engine_time"),
    ("output to the front end", "first_token_engine_time", "first_output_received_time"),
    ("detokenize", "first_output_received_time", "first_token_time"),
    ("format the first chunk", "first_token_time", "first_chunk_time"),
)


def timeline_record(out: RequestOutput) -> dict:
    """One finished request's timeline line (points it did not pass are left out)."""
    record: dict = {"request_id": out.request_id, "prompt_tokens": len(out.prompt_token_ids),
                    "output_tokens": sum(len(c.token_ids) for c in out.outputs),
                    "cached_tokens": out.num_cached_tokens}
    metrics = out.metrics or {}
    for point in POINTS + ("finished_time",):
        if metrics.get(point):
            record[point] = round(metrics[point], 6)
    return record


class RequestTimelineWriter:
    """Appends a timeline line per finished request to ``path`` (line-buffered)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: IO[str] | None = open(path, "a", buffering=1)

    def write(self, out: RequestOutput) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(timeline_record(out)) + "\n")
        except OSError as e:  # a full disk must not fail the request; stop writing instead
            logger.error("Could not write the request timeline to %s (%s); no more lines will be written.",
                         self.path, e)
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

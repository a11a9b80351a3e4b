"""`piston serve --speculative-config`: n-gram drafts behind the OpenAI API. Streams carry
several tokens per step, /metrics counts drafts and accepted tokens, and a bad config stops
the server at start-up with a message naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SMOLLM2_ARGS, ServerProcess, httpx

from piston.hal.registry import get_platform

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1})
_WORDS = "apple river stone cloud lamp tiger honey violin marble rocket"
COPY_PROMPT = f"{_WORDS}, {_WORDS}, {_WORDS}, apple river stone"


def test_speculative_server_streams_and_counts_drafts(smollm2_path):
    if not get_platform(None).supports_speculative:
        pytest.skip("this platform has no speculative decoding yet")
    server = ServerProcess(smollm2_path, *SMOLLM2_ARGS, "--served-model-name", "smollm2",
                           "--speculative-config", NGRAM)
    try:
        server.wait_ready()
        body = {"model": "smollm2", "prompt": COPY_PROMPT, "max_tokens": 24, "temperature": 0}
        plain = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json=body, timeout=60)
        assert plain.status_code == 200, plain.text
        text = plain.json()["choices"][0]["text"]
        assert plain.json()["usage"]["completion_tokens"] == 24
        with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                          json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
        assert server.metric("piston:spec_decode_num_accepted_tokens") > 0
        assert server.metric("piston:spec_decode_num_draft_tokens") >= server.metric(
            "piston:spec_decode_num_accepted_tokens")
        assert "piston:spec_decode_num_accepted_tokens_per_pos" in httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()


def test_a_bad_speculative_config_stops_the_server_with_a_clear_message(smollm2_path):
    cmd = [sys.executable, "-m", "piston.entrypoints.cli", "serve", smollm2_path,
           "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}']
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "speculative_config.num_speculative_tokens must be an integer >= 1" in done.stdout + done.stderr

"""`piston serve --kv-offloading-dir`: a restarted server finds the blocks its predecessor
wrote, and its first request reports them as cached (usage.prompt_tokens_details)."""

from __future__ import annotations

import random

import pytest
from conftest import TINY_ARGS, ServerProcess, httpx

from piston.hal.registry import get_platform


def _complete(server, prompt: list[int]) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_restarted_server_hits_the_disk_tier_on_its_first_request(tiny_models, tmp_path):
    if not get_platform(None).supports_kv_offload:
        pytest.skip("this platform has no KV offload tier yet")
    rng = random.Random(3)
    prompt = [rng.randrange(100, 40000) for _ in range(200)]
    args = (tiny_models("llama"), *TINY_ARGS, "--served-model-name", "tiny", "--kv-offloading-dir", str(tmp_path))
    first = ServerProcess(*args)
    try:
        answer = _complete(first.wait_ready(), prompt)
    finally:
        first.stop()
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = ServerProcess(*args)
    try:
        again = _complete(second.wait_ready(), prompt)
    finally:
        second.stop()
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 192}
    assert again["choices"][0]["text"] == answer["choices"][0]["text"]

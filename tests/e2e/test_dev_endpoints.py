"""The development endpoints of `piston serve --dev-mode`: sleep mode over HTTP.

A stream running when the server goes to sleep waits and finishes after the wake-up; new
requests meanwhile get 503 with Retry-After; bad levels and tags get 400; a second sleep
gets 409; the same greedy request answers the same before and after. Without --dev-mode
the routes do not exist (404), and they sit behind the API key.
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import TINY_ARGS, ServerProcess, httpx

PROMPT = "The capital of France is"
STREAM_TOKENS = 240  # with the prompt, just under the server's max-model-len of 256


@pytest.fixture(scope="module")
def servers(tiny_models):
    model = tiny_models("llama")
    launched = {"dev": ServerProcess(model, *TINY_ARGS, "--served-model-name", "tiny", "--dev-mode"),
                "plain": ServerProcess(model, *TINY_ARGS, "--served-model-name", "tiny", api_key=None)}
    yield launched
    for server in launched.values():
        server.stop()


def _call(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=server.headers, timeout=60, **kwargs)


def _greedy(server) -> str:
    r = _call(server, "POST", "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12,
                                                         "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_sleep_and_wake_up_over_http(servers):
    server = servers["dev"].wait_ready()
    before = _greedy(server)
    assert _call(server, "GET", "/is_sleeping").json()["is_sleeping"] is False

    # A long stream is running when the server goes to sleep.
    client = server.openai()
    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=STREAM_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    rest: list = []
    reader = threading.Thread(target=lambda: rest.extend(stream), daemon=True)
    reader.start()

    r = _call(server, "POST", "/sleep", params={"level": 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"is_sleeping": True, "asleep": ["kv_cache", "weights"]}
    assert _call(server, "GET", "/is_sleeping").json()["is_sleeping"] is True
    assert _call(server, "GET", "/health").status_code == 200

    refused = _call(server, "POST", "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503 and "asleep" in refused.json()["error"]["message"]
    assert "Retry-After" in refused.headers
    again = _call(server, "POST", "/sleep", params={"level": 2})
    assert again.status_code == 409 and "already asleep" in again.json()["error"]["message"]
    time.sleep(0.5)
    assert reader.is_alive(), "the stream should wait while the engine sleeps"
    bad = _call(server, "POST", "/wake_up", params={"tags": "everything"})
    assert bad.status_code == 400 and "tags" in bad.json()["error"]["message"]

    r = _call(server, "POST", "/wake_up", params={"tags": "weights"})
    assert r.json() == {"is_sleeping": True, "asleep": ["kv_cache"]}
    r = _call(server, "POST", "/wake_up")
    assert r.json() == {"is_sleeping": False, "asleep": []}

    reader.join(60)
    assert not reader.is_alive(), "the stream did not finish after the wake-up"
    # A chunk may carry several tokens (a slow reader gets them together): count by usage.
    assert "".join(c.choices[0].text for c in chunks + rest if c.choices)
    assert rest[-1].usage.completion_tokens == STREAM_TOKENS
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert _greedy(server) == before
    assert _call(server, "POST", "/reset_prefix_cache").json() == {"reset": True}


def test_sleep_level_is_checked(servers):
    server = servers["dev"].wait_ready()
    r = _call(server, "POST", "/sleep", params={"level": 3})
    assert r.status_code == 400 and "level" in r.json()["error"]["message"]
    assert _call(server, "GET", "/is_sleeping").json()["is_sleeping"] is False


def test_dev_routes_need_the_key_and_the_flag(servers):
    dev = servers["dev"].wait_ready()
    assert httpx.post(f"{dev.url}/sleep", timeout=10).status_code == 401
    plain = servers["plain"].wait_ready()
    for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
        assert _call(plain, method, path).status_code == 404

"""A hostile or unlucky client cannot take the server down or starve the others.

Two servers of the tiny model: "guarded" (API keys from $PISTON_API_KEY and a key file,
a key on /metrics, small limits, and test-only faults injected for chosen request ids)
and "open" (no keys, --restrict-priority, room for 2 running + 1 waiting requests, a 3 s
step deadline and a 6 s stall injected for one request id).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import TINY_ARGS, ServerProcess

TINY = "tiny"
ENV_KEY, FILE_KEY = "env-key", "file-key"
FAULTS = "runner:boom-runner,sampler:boom-sampler,scheduler:boom-sched,output:boom-output,stall:slow-step"
LIMITS = ["--max-n", "4", "--max-prompts-per-request", "8", "--max-stop-sequences", "2",
          "--max-stop-token-ids", "3", "--max-request-body-bytes", "64KiB"]


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# one key per line\n{FILE_KEY}\n")
    model = tiny_models("llama")
    args = [*TINY_ARGS, "--served-model-name", TINY]
    launched = {
        "guarded": ServerProcess(model, *args, *LIMITS, "--api-key-file", str(key_file), "--metrics-require-api-key",
                                 api_key=None, env={"PISTON_API_KEY": ENV_KEY, "PISTON_INJECT_FAULT": FAULTS}),
        "open": ServerProcess(model, *args, "--max-num-seqs", "2", "--max-waiting-requests", "1",
                              "--restrict-priority", api_key=None,
                              env={"PISTON_STEP_TIMEOUT_S": "3", "PISTON_INJECT_FAULT": FAULTS}),
    }
    yield launched
    for server in launched.values():
        server.stop()


@pytest.fixture(scope="module")
def guarded(servers) -> ServerProcess:
    server = servers["guarded"].wait_ready()
    server.api_key = ENV_KEY
    return server


@pytest.fixture(scope="module")
def open_server(servers) -> ServerProcess:
    return servers["open"].wait_ready()


def _post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=60, **kwargs)


def _error(r: httpx.Response) -> dict:
    payload = r.json()
    assert set(payload) == {"error"} and set(payload["error"]) >= {"message", "type", "param", "code"}, payload
    return payload["error"]


# ----- limits ------------------------------------------------------------------------


@pytest.mark.parametrize("body, param, limit", [
    ({"prompt": "hi", "n": 5}, "n", "4"),
    ({"prompt": ["a"] * 9}, "prompt", "8"),
    ({"prompt": ["a"] * 3, "n": 3}, "n", "8"),
    ({"prompt": "hi", "stop": ["x", "y", "z"]}, "stop", "2"),
    ({"prompt": "hi", "stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids", "3"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", "20"),
    ({"prompt": "hi", "logprobs": 21, "echo": True}, "logprobs", "20"),
    ({"prompt": "hi", "max_tokens": 300}, "max_tokens", "256"),
])
def test_every_completion_limit_is_a_400_naming_the_parameter_and_the_limit(guarded, body, param, limit):
    r = _post(guarded, "/v1/completions", {"model": TINY, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = _error(r)
    assert error["param"] == param and limit in error["message"], error


def test_chat_top_logprobs_is_capped_by_max_logprobs(guarded):
    r = _post(guarded, "/v1/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": "x"}],
                                                "logprobs": True, "top_logprobs": 21})
    error = _error(r)
    assert r.status_code == 400 and error["param"] == "top_logprobs" and "20" in error["message"], error


def test_a_body_over_the_limit_is_413_with_or_without_content_length(guarded):
    big = {"model": TINY, "prompt": "x" * (70 * 1024)}
    r = _post(guarded, "/v1/completions", big)
    assert r.status_code == 413 and "65536" in _error(r)["message"]

    def chunks():  # no Content-Length: the server counts the bytes as they come
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = httpx.post(f"{guarded.url}/v1/completions", content=chunks(), timeout=60,
                   headers={**guarded.headers, "content-type": "application/json"})
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "hi", "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": "hi", "priority": 18446744073709551616}', "priority"),
    (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    (b'{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
    (b'{"prompt": ""}', "prompt"),
    (b'{"prompt": []}', "prompt"),
])
def test_values_the_wire_cannot_carry_are_400_before_the_engine(guarded, raw, param):
    r = httpx.post(f"{guarded.url}/v1/completions", content=raw, timeout=30,
                   headers={**guarded.headers, "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == param


# ----- access -------------------------------------------------------------------------


def test_keys_come_from_the_environment_and_a_file_and_guard_metrics(guarded):
    for key in (ENV_KEY, FILE_KEY):
        client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == [TINY]
    assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{guarded.url}/metrics").status_code == 401
    assert "piston:num_free_kv_blocks" in httpx.get(f"{guarded.url}/metrics", headers=guarded.headers).text
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # probes need no key


def test_models_list_shows_no_file_path(guarded, tiny_models):
    payload = httpx.get(f"{guarded.url}/v1/models", headers=guarded.headers).json()
    assert tiny_models("llama") not in json.dumps(payload)
    assert payload["data"][0]["root"] == TINY


def test_restrict_priority_lets_no_unauthenticated_caller_jump_the_queue(open_server):
    r = httpx.post(f"{open_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": -1})
    assert r.status_code == 403 and _error(r)["param"] == "priority"
    ok = httpx.post(f"{open_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": 5})
    assert ok.status_code == 200, ok.text


# ----- capacity and health --------------------------------------------------------------


def test_requests_past_the_waiting_bound_get_503_with_retry_after(open_server):
    async def run():
        async with httpx.AsyncClient(base_url=open_server.url, timeout=120) as client:
            body = {"prompt": "hold", "max_tokens": 8}
            # The first request's step stalls the engine for 6 s, so 3 requests stay unfinished
            # (2 may run, 1 may wait) and a 4th has no room.
            held = [asyncio.ensure_future(client.post("/v1/completions", json=body,
                                                      headers={"X-Request-Id": "slow-step"}))]
            await asyncio.sleep(0.5)
            held += [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(2)]
            await asyncio.sleep(0.5)
            refused = await client.post("/v1/completions", json=body)
            done = await asyncio.gather(*held)
            return refused, done

    refused, done = asyncio.run(run())
    assert refused.status_code == 503 and refused.headers.get("retry-after") == "1", refused.text
    assert "capacity" in _error(refused)["message"]
    assert [r.status_code for r in done] == [200, 200, 200]


def test_health_tells_a_long_step_from_a_wedged_engine(open_server):
    def health() -> tuple[int, dict, float]:
        start = time.monotonic()
        r = httpx.get(f"{open_server.url}/health", timeout=10)
        return r.status_code, r.json(), time.monotonic() - start

    async def stalled_request():
        async with httpx.AsyncClient(base_url=open_server.url, timeout=60) as client:
            return await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                                     headers={"X-Request-Id": "slow-step"})

    async def run():
        task = asyncio.ensure_future(stalled_request())
        seen = []
        loop = asyncio.get_running_loop()
        while not task.done():
            seen.append(await loop.run_in_executor(None, health))
            await asyncio.sleep(0.3)
        return await task, seen

    response, seen = asyncio.run(run())
    assert response.status_code == 200, response.text  # a long step finishes normally
    assert max(t for *_, t in seen) < 2.0, "/health waited for the step"
    states = [(status, body.get("engine"), body.get("error", {}).get("message", "")) for status, body, _ in seen]
    assert (200, "busy", "") in states, states  # busy within the 3 s deadline: healthy
    assert any(status == 503 and "wedged" in message for status, _, message in states), states
    assert health()[0] == 200  # healthy again as soon as the step is over


# ----- fault isolation -----------------------------------------------------------------


def _blocks(server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("piston:num_free_kv_blocks", "piston:num_total_kv_blocks"))}
    return values["piston:num_free_kv_blocks"], values["piston:num_total_kv_blocks"]


@pytest.mark.parametrize("stage", ["runner", "sampler", "scheduler", "output"])
def test_a_request_that_fails_fails_alone(guarded, stage):
    prompts = [f"Request {i} tells a story about" for i in range(5)]
    client = guarded.openai()
    expected = [client.completions.create(model=TINY, prompt=p, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    bad_id = f"boom-{stage}"

    async def run():
        aclient = guarded.async_openai()

        async def good(prompt: str) -> str:
            text = ""
            stream = await aclient.completions.create(model=TINY, prompt=prompt, max_tokens=24, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                text += chunk.choices[0].text if chunk.choices else ""
            return text

        async def bad() -> httpx.Response:
            async with httpx.AsyncClient(base_url=guarded.url, timeout=60) as h:
                return await h.post("/v1/completions", headers={**guarded.headers, "X-Request-Id": bad_id},
                                    json={"model": TINY, "prompt": "doomed", "max_tokens": 24,
                                          "ignore_eos": True})

        try:
            return await asyncio.gather(bad(), *(good(p) for p in prompts))
        finally:
            await aclient.close()

    failed, *texts = asyncio.run(run())
    assert failed.status_code == 500, failed.text
    error = _error(failed)
    assert error["type"] == "internal_server_error" and "injected fault" in error["message"], error
    assert texts == expected
    deadline = time.monotonic() + 10
    while (blocks := _blocks(guarded))[0] != blocks[1]:
        assert time.monotonic() < deadline, f"{blocks[0]} of {blocks[1]} KV blocks free after the failure"
        time.sleep(0.2)
    # And the server goes on serving.
    assert client.completions.create(model=TINY, prompt=prompts[0], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text == expected[0]


def test_a_failed_request_in_a_stream_ends_with_an_error_event(guarded):
    body = {"model": TINY, "prompt": "doomed", "max_tokens": 24, "stream": True}
    with httpx.stream("POST", f"{guarded.url}/v1/completions", json=body, timeout=60,
                      headers={**guarded.headers, "X-Request-Id": "boom-sampler"}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == 500

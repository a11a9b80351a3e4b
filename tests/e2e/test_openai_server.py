"""`piston serve` driven by the official openai client (and raw HTTP where clients can't)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import openai
import pytest

try:
    import httpx
except ImportError:  # some environments ship httpx under its successor's name
    import httpx2 as httpx

TINY = "tiny"
GREEDY = dict(temperature=0.0)


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str | None], list]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


# ----- completions ------------------------------------------------------------------


def test_completion_returns_text_usage_and_ids(tiny_server):
    r = tiny_server.openai().completions.create(
        model=TINY, prompt="Hello there", max_tokens=8, extra_body={"ignore_eos": True}, **GREEDY)
    assert r.id.startswith("cmpl-") and r.model == TINY and r.created > 0
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_streamed_completion_equals_plain(tiny_server):
    client = tiny_server.openai()
    kwargs = dict(model=TINY, prompt="The quick brown fox", max_tokens=24, **GREEDY)
    plain = client.completions.create(**kwargs)
    texts, reasons, _ = _stream_text(client.completions.create(stream=True, **kwargs))
    assert texts[0] == plain.choices[0].text
    assert reasons[0] == plain.choices[0].finish_reason


def test_n_and_prompt_list_index_choices(tiny_server):
    r = tiny_server.openai().completions.create(
        model=TINY, prompt=["one", "two two", "three"], n=2, max_tokens=4, temperature=1.0,
        seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert r.usage.completion_tokens == 6 * 4


def test_stop_string_cuts_text_plain_and_streamed(tiny_server):
    client = tiny_server.openai()
    kwargs = dict(model=TINY, prompt="Once upon a time", max_tokens=24, **GREEDY)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[6:9]
    assert stop.strip(), f"degenerate text {full!r}"
    cut = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    texts, reasons, _ = _stream_text(client.completions.create(stop=stop, stream=True, **kwargs))
    assert texts[0] == cut.text and reasons[0] == "stop"


def test_completion_logprobs_and_echo(tiny_server):
    r = tiny_server.openai().completions.create(model=TINY, prompt="Hi there", max_tokens=5,
                                                logprobs=2, echo=True, **GREEDY)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("Hi there")
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_seed_makes_sampling_reproducible(tiny_server):
    client = tiny_server.openai()
    kwargs = dict(model=TINY, prompt="Random", max_tokens=12, temperature=1.0, seed=1234)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_penalties_and_extra_body_are_accepted(tiny_server):
    r = tiny_server.openai().completions.create(
        model=TINY, prompt="a a a", max_tokens=6, presence_penalty=0.5, frequency_penalty=0.5,
        extra_body=dict(top_k=5, min_p=0.05, repetition_penalty=1.2, min_tokens=6,
                        priority=1), user="alice")
    assert r.usage.completion_tokens == 6


def test_include_usage_sends_a_last_usage_chunk(tiny_server):
    client = tiny_server.openai()
    chunks = list(client.completions.create(model=TINY, prompt="Count", max_tokens=5,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    chat = list(client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens <= 5


# ----- chat -------------------------------------------------------------------------


def test_chat_plain_and_streamed_agree(tiny_server):
    client = tiny_server.openai()
    kwargs = dict(model=TINY, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
        max_completion_tokens=16, **GREEDY)
    plain = client.chat.completions.create(**kwargs)
    assert plain.id.startswith("chatcmpl-") and plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    texts, reasons, chunks = _stream_text(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert texts[0] == plain.choices[0].message.content
    assert reasons[0] == plain.choices[0].finish_reason


def test_chat_n_and_logprobs(tiny_server):
    r = tiny_server.openai().chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "Hello"}], n=2, max_tokens=4,
        logprobs=True, top_logprobs=3, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        content = choice.logprobs.content
        assert len(content) == 4
        for tok in content:
            assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
            assert bytes(tok.bytes).decode("utf-8", "replace") == tok.token


# ----- errors -----------------------------------------------------------------------


def test_wrong_or_missing_api_key_is_401(tiny_server):
    bad = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_malformed_json_and_wrong_types_are_400(tiny_server):
    url, headers = f"{tiny_server.url}/v1/completions", tiny_server.headers
    r = httpx.post(url, content=b'{"prompt": "hi",', headers={
        **headers, "content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "param", "code"}
    r = httpx.post(url, json={"prompt": "hi", "n": "many"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_bad_parameter_is_400_and_server_keeps_serving(tiny_server):
    client = tiny_server.openai()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=TINY, prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)
    assert client.completions.create(model=TINY, prompt="hi", max_tokens=2).choices


def test_unknown_model_is_404(tiny_server):
    with pytest.raises(openai.NotFoundError):
        tiny_server.openai().completions.create(model="no-such-model", prompt="hi")


def test_prompt_over_the_context_is_400(tiny_server):
    with pytest.raises(openai.BadRequestError, match="max_model_len=256"):
        tiny_server.openai().completions.create(model=TINY, prompt=[100] * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        tiny_server.openai().completions.create(model=TINY, prompt="hi", max_tokens=1000)


# ----- concurrency, disconnects, endpoints ------------------------------------------------


def _timeline_records(server, response_ids: set[str], timeout: float = 10.0) -> dict[str, dict]:
    """The server's timeline lines of these responses (a completion's line carries the
    response id plus the prompt's index), keyed by response id."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        with open(server.timeline_file) as f:
            for line in f:
                record = json.loads(line)
                for rid in (record["request_id"], record["request_id"].rsplit("-", 1)[0]):
                    if rid in response_ids:
                        found[rid] = record
        if len(found) == len(response_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_request_timeline_records_every_stage_in_order(tiny_server):
    from piston.entrypoints.openai.request_timeline import POINTS

    client = tiny_server.openai()
    sent = time.monotonic()
    stream = client.completions.create(model=TINY, prompt="The timeline of", max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    chat = list(client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    plain = client.completions.create(model=TINY, prompt="No stream", max_tokens=2)
    done = time.monotonic()
    records = _timeline_records(tiny_server, {chunks[0].id, chat[0].id, plain.id})
    assert set(records) == {chunks[0].id, chat[0].id, plain.id}
    usage = chunks[-1].usage
    stream_record = records[chunks[0].id]
    assert (stream_record["prompt_tokens"], stream_record["output_tokens"]) == \
        (usage.prompt_tokens, usage.completion_tokens)
    for rid, record in records.items():
        streamed = rid != plain.id
        points = [p for p in POINTS if streamed or p != "first_chunk_time"]
        assert set(points) <= set(record), f"{rid} misses {set(points) - set(record)}"
        times = [record[p] for p in points]
        # One clock for the client, the front end and the engine process: the stamps are in
        # path order and inside the client's own send and receive.
        assert times == sorted(times), dict(zip(points, times))
        assert sent <= times[0] and times[-1] <= record["finished_time"] <= done
    # A server on the CPU caps a step's prompt tokens (the platform's online default).
    if os.environ.get("PISTON_PLATFORM", "cpu") == "cpu":
        assert "prompt tokens per step: 128" in tiny_server.log_tail(10**7)


def test_32_concurrent_streams_all_complete(tiny_server):
    async def one(client, i: int) -> tuple[str, str]:
        stream = await client.completions.create(model=TINY, prompt=f"Request {i}:",
                                                 max_tokens=4, stream=True,
                                                 extra_body={"ignore_eos": True})
        text, reason = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                reason = choice.finish_reason or reason
        return text, reason

    async def main():
        client = tiny_server.async_openai()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 32 and all(reason == "length" for _, reason in results)


def _wait_all_blocks_free(server, timeout: float = 10.0) -> None:
    total = server.metric("piston:num_total_kv_blocks")
    deadline = time.monotonic() + timeout
    while (free := server.metric("piston:num_free_kv_blocks")) != total:
        assert time.monotonic() < deadline, f"{free} of {total} KV blocks free after disconnect"
        time.sleep(0.2)


def test_disconnected_stream_frees_every_kv_block(tiny_server):
    body = {"model": TINY, "prompt": "Stream forever " * 8, "max_tokens": 200, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json=body,
                      headers=tiny_server.headers, timeout=30) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert got
    _wait_all_blocks_free(tiny_server)
    assert tiny_server.metric("piston:num_requests_running") == 0


def _completed_by_length(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("piston:request_success_total{") and 'finish_reason="length"' in line)


def test_disconnected_plain_request_frees_every_kv_block(tiny_server):
    # 4 x 200 tokens take the tiny model far longer than the 0.1 s the client waits.
    body = {"model": TINY, "prompt": "Wait for me " * 8, "max_tokens": 200, "n": 4,
            "ignore_eos": True}
    completed = _completed_by_length(tiny_server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{tiny_server.url}/v1/completions", json=body, headers=tiny_server.headers,
                   timeout=0.1)
    _wait_all_blocks_free(tiny_server)
    assert _completed_by_length(tiny_server) == completed, "the request ran to the end, not aborted"


def test_models_health_version_and_metrics(tiny_server):
    models = tiny_server.openai().models.list()
    assert [m.id for m in models.data] == [TINY]
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    assert "version" in httpx.get(f"{tiny_server.url}/version").json()
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in ("piston:request_success_total", "piston:prompt_tokens_total",
                 "piston:generation_tokens_total", "piston:time_to_first_token_seconds",
                 "piston:e2e_request_latency_seconds", "piston:request_queue_time_seconds",
                 "piston:time_per_output_token_seconds", "piston:kv_cache_usage_perc",
                 "piston:num_requests_waiting", "piston:prefix_cache_hit_rate"):
        assert name in text


# ----- the real model -------------------------------------------------------------------


def test_smollm2_chat_template_and_greedy_stream_equals_plain(smollm2_server, smollm2_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    kwargs = dict(model="smollm2", messages=messages, max_tokens=10, **GREEDY)

    async def both():
        client = smollm2_server.async_openai()
        try:
            async def streamed() -> str:
                text = ""
                async for chunk in await client.chat.completions.create(stream=True, **kwargs):
                    text += "".join(c.delta.content or "" for c in chunk.choices)
                return text

            # Run together (one batch): the real model is slow on a shared CPU.
            return await asyncio.gather(client.chat.completions.create(**kwargs), streamed())
        finally:
            await client.close()

    plain, streamed_text = asyncio.run(both())
    templated = smollm2_tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
    assert plain.usage.prompt_tokens == len(
        smollm2_tokenizer(templated, add_special_tokens=False).input_ids)
    assert "Paris" in plain.choices[0].message.content
    assert streamed_text == plain.choices[0].message.content
    json.dumps(plain.model_dump())  # a plain, serializable response


# ----- engine death -------------------------------------------------------------------


def _engine_children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()
            if "resource_tracker" not in " ".join(c.cmdline())]


# Runs last: it kills the engine of the module's tiny server (a second server would
# cost a model load on a busy machine).
def test_engine_death_fails_in_flight_requests_makes_health_503_and_exits_nonzero(tiny_server):
    server = tiny_server
    body = {"model": TINY, "prompt": "x", "max_tokens": 240, "ignore_eos": True}
    outcome: dict = {}

    def plain():
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60)
        outcome["plain"] = (r.status_code, r.json())

    thread = threading.Thread(target=plain, daemon=True)
    thread.start()
    events = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                      headers=server.headers, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:  # the first generated token: both requests are mid-generation now
            if line.startswith("data: {"):
                break
        children = _engine_children(server.proc.pid)
        assert children, "the server has no engine process"
        for pid in children:
            os_kill(pid)
        start = time.monotonic()
        while (health := httpx.get(f"{server.url}/health", timeout=5)).status_code == 200:
            assert time.monotonic() - start < 3, "/health still says 200 three seconds after the engine died"
            time.sleep(0.05)
        events = [line for line in lines if line.startswith("data:")]
    assert health.status_code == 503, health.text
    assert health.json()["error"]["type"] == "service_unavailable_error"
    # The stream ends with an error event (OpenAI's error shape), then [DONE].
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2][len("data: "):])
    assert error["error"]["code"] == 503 and "engine" in error["error"]["message"], error
    thread.join(30)
    assert not thread.is_alive(), "an in-flight request hung after the engine died"
    status, payload = outcome["plain"]
    assert status == 503 and payload["error"]["type"] == "service_unavailable_error", outcome
    returncode = server.proc.wait(15)
    assert returncode != 0, server.log_tail()
    assert time.monotonic() - start < 15


def os_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

"""Soak: 128 concurrent streams for a while, a third of them hanging up at random points and
some carrying bad parameters; nothing unexpected may happen and nothing may leak.

Every good stream's text must equal the same request's non-streamed text, every bad one
must get its 400, and at the end every KV block must be free again. PISTON_SOAK_SECONDS
bounds the run (default 20 s here; `nox -s soak` runs 10 minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
from conftest import ServerProcess

STREAMS = 128
SECONDS = float(os.environ.get("PISTON_SOAK_SECONDS", "20"))
PROMPTS = [f"Soak prompt {i}: the story of a {w}" for i, w in enumerate(
    ["river", "clock", "lamp", "horse", "cloud", "stone", "violin", "garden", "window", "anchor", "mirror",
     "forest", "kettle", "comet", "ladder", "harbor"])]
BAD = [
    ({"temperature": -1}, "temperature"),
    ({"n": 1000}, "n"),
    ({"logprobs": 1000}, "logprobs"),
    ({"stop": ["a"] * 100}, "stop"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
]
GEN = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


def _free_blocks(server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("piston:num_free_kv_blocks", "piston:num_total_kv_blocks"))}
    return values["piston:num_free_kv_blocks"], values["piston:num_total_kv_blocks"]


def test_soak_128_streams_with_disconnects_and_bad_requests(tiny_models):
    server = ServerProcess(tiny_models("llama"), "--max-model-len", "256", "--kv-cache-memory", "16MiB",
                           "--max-num-seqs", "64", "--served-model-name", "tiny").wait_ready()
    try:
        _soak(server)
    finally:
        server.stop()


def _soak(server) -> None:
    url, headers = f"{server.url}/v1/completions", server.headers
    expected = {}
    for p in PROMPTS:
        r = httpx.post(url, json={"model": "tiny", "prompt": p, **GEN}, headers=headers, timeout=60)
        expected[p] = r.json()["choices"][0]["text"]
    counts = {"good": 0, "disconnected": 0, "bad": 0}
    unexpected: list[str] = []

    async def good(client: httpx.AsyncClient, rng: random.Random, hang_up: bool) -> None:
        prompt = rng.choice(PROMPTS)
        stop_after = rng.randint(1, 20)
        text, chunks = "", 0
        async with client.stream("POST", url, json={"model": "tiny", "prompt": prompt, "stream": True, **GEN},
                                 headers=headers) as r:
            if r.status_code != 200:
                unexpected.append(f"stream got {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    unexpected.append(f"stream error event: {payload}")
                    return
                text += payload["choices"][0]["text"]
                chunks += 1
                if hang_up and chunks >= stop_after:
                    counts["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
        if text != expected[prompt]:
            unexpected.append(f"{prompt!r}: streamed {text!r} != plain {expected[prompt]!r}")
        counts["good"] += 1

    async def bad(client: httpx.AsyncClient, rng: random.Random) -> None:
        fields, param = rng.choice(BAD)
        r = await client.post(url, json={"model": "tiny", "prompt": "x", **GEN, **fields}, headers=headers)
        if r.status_code != 400 or r.json()["error"]["param"] != param:
            unexpected.append(f"bad {fields} got {r.status_code}: {r.text[:200]}")
        counts["bad"] += 1

    async def worker(i: int, deadline: float) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < deadline:
                roll = rng.random()
                try:
                    if roll < 0.1:
                        await bad(client, rng)
                    else:
                        await good(client, rng, hang_up=roll < 0.4)
                except httpx.HTTPError as e:
                    unexpected.append(f"worker {i}: {type(e).__name__}: {e}")

    async def run() -> None:
        deadline = time.monotonic() + SECONDS
        await asyncio.gather(*(worker(i, deadline) for i in range(STREAMS)))

    start = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 15
    while (blocks := _free_blocks(server))[0] != blocks[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"soak: {STREAMS} concurrent clients for {elapsed:.0f} s: {counts['good']} streams completed, "
          f"{counts['disconnected']} disconnected mid-stream, {counts['bad']} bad requests answered 400; "
          f"{len(unexpected)} unexpected; KV blocks free at the end {blocks[0]:.0f} of {blocks[1]:.0f}")
    assert not unexpected, unexpected[:10]
    assert blocks[0] == blocks[1], f"{blocks[0]} of {blocks[1]} KV blocks free after the soak"
    assert counts["good"] > STREAMS and counts["disconnected"] > 0 and counts["bad"] > 0, counts
    assert server.proc.poll() is None

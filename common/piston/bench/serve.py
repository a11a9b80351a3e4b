"""``piston bench serve``: load a running OpenAI-compatible server and time every token.

Requests go to /v1/completions as streams (SSE) with ``ignore_eos`` so each returns
exactly the asked number of tokens. They arrive as a Poisson process at
``--request-rate`` (``inf``: all at once), optionally capped at ``--max-concurrency``
in flight. Reported: TTFT, TPOT, ITL and E2E latency (mean, p50, p90, p99), request
and token throughput, goodput against the SLOs given with ``--goodput``, and failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field

from piston.bench import print_table, run_metadata, summarize, write_json
from piston.bench.datasets import SampleRequest, add_dataset_args, check_dataset_args, sample_requests

try:
    import httpx
except ImportError:  # some environments ship httpx under its successor's name
    import httpx2 as httpx

SLO_METRICS = ("ttft", "tpot", "e2e")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Server, load-shape, SLO and dataset flags of ``piston bench serve``."""
    add = parser.add_argument
    add("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 "
        "(default: http://HOST:PORT)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--model", default=None, help="the served model name (default: the server's first)")
    add("--tokenizer", default=None, help="tokenizer folder or .gguf for building prompts "
        "(default: --model when it is a local path, else the built-in default model's)")
    add("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    add("--request-rate", type=float, default=float("inf"),
        help="requests per second, Poisson arrivals (default inf: all at once)")
    add("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    add("--seed", type=int, default=0, help="seed of the arrival times")
    add("--goodput", nargs="+", default=None, metavar="METRIC:MS",
        help="SLOs a good request meets, e.g. ttft:500 tpot:50 e2e:10000 (milliseconds)")
    add("--request-timeout", type=float, default=600.0, help="seconds per request")
    add("--output-json", default=None, help="write every figure to this file")
    add("--disable-tqdm", action="store_true")
    add_dataset_args(parser, num_prompts=64)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 0.5, "tpot": 0.05}`` (seconds)."""
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS or not value:
            raise ValueError(f"--goodput {item!r}: give METRIC:MILLISECONDS with METRIC one of "
                             f"{', '.join(SLO_METRICS)}, e.g. ttft:500.")
        slos[name] = float(value) / 1000.0
    return slos


@dataclass
class RequestResult:
    prompt_len: int
    ok: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: str = ""
    # The server's id for it, and time.monotonic() when it was sent: with the server's
    # --request-timeline-file they place the client's view on the server's timeline.
    request_id: str = ""
    start_time: float = 0.0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send_request(client, url: str, payload: dict, prompt_len: int) -> RequestResult:
    """POST one streamed completion and time its chunks; errors become a failed result."""
    res = RequestResult(prompt_len)
    # time.monotonic: the clock the server's request timeline uses (one per machine).
    start = last = res.start_time = time.monotonic()
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                if chunk.get("choices"):
                    now = time.monotonic()
                    if chunks == 0:
                        res.ttft = now - start
                        res.request_id = chunk.get("id", "")
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
        res.e2e = time.monotonic() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = chunks > 0
        res.error = "" if res.ok else "the stream ended without a token"
    except Exception as e:  # a failed request is a figure, not the end of the run
        res.error = f"{type(e).__name__}: {e}"
    return res


def _payload(model: str, req: SampleRequest, max_tokens: int | None = None) -> dict:
    return {"model": model, "prompt": req.prompt, "temperature": 0.0, "stream": True,
            "max_tokens": max_tokens or req.expected_output_len, "ignore_eos": True,
            "stream_options": {"include_usage": True}}


async def run_load(client, url: str, model: str, requests: list[SampleRequest],
                   request_rate: float, max_concurrency: int | None, seed: int,
                   show_progress: bool) -> tuple[list[RequestResult], float]:
    """Send every request on the arrival schedule; returns the results and the duration."""
    import numpy as np
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    gaps = (np.zeros(len(requests)) if request_rate == float("inf")
            else rng.exponential(1.0 / request_rate, size=len(requests)))
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc="Requests", unit="req", disable=not show_progress)

    async def one(req: SampleRequest) -> RequestResult:
        if limit is None:
            res = await send_request(client, url, _payload(model, req), req.prompt_len)
        else:
            async with limit:
                res = await send_request(client, url, _payload(model, req), req.prompt_len)
        bar.update(1)
        return res

    start = time.perf_counter()
    tasks = []
    for req, gap in zip(requests, gaps):
        tasks.append(asyncio.create_task(one(req)))
        if gap > 0:
            await asyncio.sleep(gap)
    results = await asyncio.gather(*tasks)
    bar.close()
    return list(results), time.perf_counter() - start


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO (seconds; a one-token output has no TPOT)."""
    values = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2e": result.e2e}
    return all(values[name] <= limit for name, limit in slos.items())


def compute_metrics(results: list[RequestResult], duration: float,
                    slos: dict[str, float]) -> dict:
    """Every figure of a run: latency summaries in ms, throughputs, goodput, failures."""
    done = [r for r in results if r.ok]
    ms = lambda xs: {k: 1000 * v for k, v in summarize(xs).items()}  # noqa: E731
    tpots = [r.tpot for r in done if r.tpot is not None]
    good = [r for r in done if meets_slos(r, slos)]
    n_in, n_out = sum(r.prompt_len for r in done), sum(r.output_tokens for r in done)
    errors = list(dict.fromkeys(r.error for r in results if not r.ok))
    return {
        "duration_s": duration, "completed": len(done), "failed": len(results) - len(done),
        "first_errors": errors[:5], "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(done) / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "goodput_slos_ms": {k: 1000 * v for k, v in slos.items()},
        "goodput": len(good) / duration if slos else None,
        "ttft_ms": ms([r.ttft for r in done]), "tpot_ms": ms(tpots),
        "itl_ms": ms([x for r in done for x in r.itl]), "e2e_ms": ms([r.e2e for r in done]),
    }


def _tokenizer_source(args: argparse.Namespace, served: str) -> str:
    for candidate in (args.tokenizer, args.model, served):
        if candidate and os.path.exists(os.path.expanduser(candidate)):
            return os.path.expanduser(candidate)
    from piston.model_resolver import default_model_path

    print("note: no local tokenizer named (--tokenizer); building prompts with the built-in "
          "default model's tokenizer.")
    return default_model_path()


async def _bench(args: argparse.Namespace) -> dict:
    from piston.tokenizer import load_tokenizer

    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=args.request_timeout,
                                 limits=limits) as client:
        try:
            models = (await client.get(f"{base}/v1/models")).json()["data"]
        except Exception as e:
            raise OSError(f"No OpenAI-compatible server answered at {base}/v1/models "
                          f"({type(e).__name__}: {e}); start one with `piston serve` or "
                          "pass --base-url / --host / --port.") from e
        model = args.model or models[0]["id"]
        requests = sample_requests(args, load_tokenizer(_tokenizer_source(args, model)))
        url = f"{base}/v1/completions"
        probe = await send_request(client, url, _payload(model, requests[0], 2),
                                   requests[0].prompt_len)
        if not probe.ok:
            raise ValueError(f"The test request to {url} failed: {probe.error}")
        results, duration = await run_load(client, url, model, requests, args.request_rate,
                                           args.max_concurrency, args.seed,
                                           not args.disable_tqdm)
    return {"base_url": base, "model": model, "results": results, "duration": duration}


def main(args: argparse.Namespace) -> int:
    """Run the load ``args`` describe; print the summary and write --output-json."""
    slos = parse_goodput(args.goodput)
    check_dataset_args(args)
    run = asyncio.run(_bench(args))
    metrics = compute_metrics(run["results"], run["duration"], slos)
    report = {**run_metadata("serve", args), "base_url": run["base_url"],
              "model": {"name": run["model"]}, "results": metrics,
              "requests": [{"request_id": r.request_id, "start_time": r.start_time, "ttft_s": r.ttft,
                            "e2e_s": r.e2e, "prompt_len": r.prompt_len, "output_tokens": r.output_tokens,
                            "ok": r.ok} for r in run["results"]]}
    _print_summary(args, metrics)
    write_json(args.output_json, report)
    return 0 if metrics["completed"] else 1


def _print_summary(args: argparse.Namespace, m: dict) -> None:
    rows = [("Successful requests", m["completed"]), ("Failed requests", m["failed"]),
            ("Request rate (req/s)", str(args.request_rate)),
            ("Max concurrency", str(args.max_concurrency)),
            ("Benchmark duration (s)", m["duration_s"]),
            ("Total input tokens", m["total_input_tokens"]),
            ("Total generated tokens", m["total_output_tokens"]),
            ("Request throughput (req/s)", m["request_throughput"]),
            ("Output token throughput (tok/s)", m["output_throughput"]),
            ("Total token throughput (tok/s)", m["total_token_throughput"])]
    if m["goodput"] is not None:
        rows.append(("Request goodput (req/s)", m["goodput"]))
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token "
                       "(excl. 1st token)"), ("itl_ms", "Inter-token Latency"),
                       ("e2e_ms", "End-to-end Latency")):
        rows.append((f"-- {title} --", None))
        name = key.split("_")[0].upper()
        rows += [(f"{stat.title()} {name} (ms)", m[key][stat])
                 for stat in ("mean", "p50", "p90", "p99")]
    print_table("Serving Benchmark Result", rows)
    for err in m["first_errors"]:
        print(f"error: {err}")

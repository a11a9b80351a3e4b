"""Where the time to first token goes: a server's request timeline, stage by stage.

    piston serve --request-timeline-file /tmp/timeline.jsonl &
    piston bench serve --max-concurrency 8 --num-prompts 32 --input-len 128 --output-len 64 \\
        --output-json /tmp/c8.json
    python benchmarks/request_timeline.py /tmp/timeline.jsonl --bench /tmp/c8.json

Prints, for each stage of ``piston.entrypoints.openai.request_timeline.STAGES`` (and, with
``--bench``, the client's own send and receive on either side), the median, p90 and mean
in milliseconds and the stage's share of the mean time to first token. With ``--bench``
only the requests of that run are counted (its ids are matched against the timeline's),
and its warm-up probe is left out. Client and server must run on the same machine: the
stamps are time.monotonic() seconds, one clock per machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from piston.entrypoints.openai.request_timeline import STAGES


def read_timeline(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def join_bench(records: list[dict], bench_path: str) -> list[dict]:
    """The timeline records of the bench run's requests, each with the client's send time
    (``client_send_time``) and first-token receive time (``client_first_token_time``)."""
    with open(bench_path) as f:
        bench = json.load(f)
    by_id = {}
    for r in records:
        # A completion's engine request id is "<response id>-<prompt index>".
        by_id.setdefault(r["request_id"].rsplit("-", 1)[0], r)
        by_id.setdefault(r["request_id"], r)
    joined = []
    for req in bench.get("requests", []):
        record = by_id.get(req.get("request_id", ""))
        if record is None or not req.get("ok"):
            continue
        joined.append({**record, "client_send_time": req["start_time"],
                       "client_first_token_time": req["start_time"] + req["ttft_s"]})
    return joined


def stages(with_client: bool) -> list[tuple[str, str, str]]:
    """(name, from point, to point) of every stage in path order; ``with_client`` adds the
    client's side (points of ``join_bench``) at either end."""
    if not with_client:
        return list(STAGES)
    return ([("client to server", "client_send_time", "received_time"), *STAGES,
             ("server to client", "first_chunk_time", "client_first_token_time")])


def stage_table(records: list[dict], with_client: bool) -> list[tuple[str, list[float]]]:
    """(stage name, durations in ms) for every stage, in path order."""
    table = []
    for name, start, end in stages(with_client):
        values = [1000 * (r[end] - r[start]) for r in records if r.get(start) and r.get(end)]
        table.append((name, values))
    return table


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timeline", help="the server's --request-timeline-file")
    parser.add_argument("--bench", default=None, help="a `piston bench serve --output-json` file of the same run")
    parser.add_argument("--output-json", default=None, help="write the table here too")
    args = parser.parse_args(argv)
    records = read_timeline(args.timeline)
    if args.bench:
        records = join_bench(records, args.bench)
    if not records:
        print("No requests to show (with --bench: none of its request ids is in the timeline).", file=sys.stderr)
        return 1
    start, end = ("client_send_time", "client_first_token_time") if args.bench else ("received_time",
                                                                                    "first_chunk_time")
    ttft = [1000 * (r[end] - r[start]) for r in records if r.get(start) and r.get(end)]
    total = statistics.mean(ttft) if ttft else float("nan")
    print(f"{len(records)} requests; time to first token ({'client' if args.bench else 'server'} view): "
          f"median {statistics.median(ttft):.1f} ms, mean {total:.1f} ms" if ttft else f"{len(records)} requests")
    print(f"{'stage':<28}{'median ms':>11}{'p90 ms':>10}{'mean ms':>10}{'share':>8}")
    rows = []
    for name, values in stage_table(records, bool(args.bench)):
        if not values:
            print(f"{name:<28}{'-':>11}{'-':>10}{'-':>10}{'-':>8}")
            continue
        mean = statistics.mean(values)
        row = {"stage": name, "median_ms": statistics.median(values), "p90_ms": percentile(values, 0.9),
               "mean_ms": mean, "share_of_mean_ttft": mean / total if ttft else None}
        rows.append(row)
        print(f"{name:<28}{row['median_ms']:>11.1f}{row['p90_ms']:>10.1f}{mean:>10.1f}"
              f"{row['share_of_mean_ttft'] or 0:>8.1%}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"requests": len(records), "ttft_mean_ms": total, "stages": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

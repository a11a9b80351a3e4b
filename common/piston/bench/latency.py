"""``piston bench latency``: how long one batch takes end to end.

Runs a batch of ``--batch-size`` random prompts of ``--input-len`` tokens, each asked
for exactly ``--output-len`` tokens, ``--num-iters`` times after ``--num-iters-warmup``
warm-ups, and reports the mean, p50, p90 and p99 latency. From the engine's per-request
timestamps it also reports the time to first token and the time per output token; at
batch 1 that decode time is compared with the memory-bandwidth bound of this machine.
"""

from __future__ import annotations

import argparse
import time

from piston.bench import (describe_model, print_table, run_metadata, spec_decode_figures, spec_decode_rows,
                          summarize, write_json)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Batch, iteration, engine and report flags of ``piston bench latency``."""
    from piston.bench.throughput import add_report_args
    from piston.engine.arg_utils import EngineArgs

    add = parser.add_argument
    add("--batch-size", type=int, default=8)
    add("--input-len", type=int, default=32, help="prompt tokens per request")
    add("--output-len", type=int, default=128, help="generated tokens per request")
    add("--num-iters-warmup", type=int, default=2)
    add("--num-iters", type=int, default=5)
    add("--dataset-seed", type=int, default=0, help="seed of the random prompts")
    EngineArgs.add_cli_args(parser)
    add_report_args(parser)


def _request_times(outputs) -> tuple[list[float], list[float]]:
    """Per request: time to first token, and mean time per output token after it."""
    ttfts, tpots = [], []
    for out in outputs:
        m, n = out.metrics or {}, len(out.outputs[0].token_ids)
        if "first_token_time" not in m:
            continue
        ttfts.append(m["first_token_time"] - m["arrival_time"])
        if n > 1 and "finished_time" in m:
            tpots.append((m["finished_time"] - m["first_token_time"]) / (n - 1))
    return ttfts, tpots


def main(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe; print the summary and write --output-json."""
    from piston import LLM, SamplingParams
    from piston.bench import roofline
    from piston.bench.datasets import random_requests
    from piston.engine.arg_utils import EngineArgs

    if args.batch_size < 1 or args.num_iters < 1 or args.output_len < 1:
        raise ValueError("--batch-size, --num-iters and --output-len must be >= 1.")
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    try:
        requests = random_requests(llm.get_tokenizer(), args.batch_size, args.input_len,
                                   args.output_len, seed=args.dataset_seed)
        prompts = [r.prompt for r in requests]
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
        latencies, ttfts, tpots = [], [], []
        for i in range(args.num_iters_warmup + args.num_iters):
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            phase = "warm-up" if i < args.num_iters_warmup else "iteration"
            print(f"{phase} {i + 1 - (args.num_iters_warmup if phase == 'iteration' else 0)}: "
                  f"{elapsed:.3f} s")
            if i >= args.num_iters_warmup:
                latencies.append(elapsed)
                t, p = _request_times(outputs)
                ttfts += t
                tpots += p
        spec = spec_decode_figures(llm.llm_engine.get_stats())
    finally:
        llm.llm_engine.shutdown()  # idempotent: also on errors
    config, ceilings = roofline.ceilings_after_shutdown(llm, args.dtype, args.calibration_seconds)

    model_config = config.model_config
    hf = model_config.hf_config
    context = args.input_len + args.output_len // 2
    bound = roofline.decode_bandwidth_bound(hf, model_config.dtype,
                                            ceilings["bandwidth_bytes_per_s"], context)
    tpot = summarize(tpots)["mean"] if tpots else None
    results = {
        "latency_s": summarize(latencies, (10, 25, 50, 75, 90, 99)),
        "ttft_s": summarize(ttfts), "tpot_s": summarize(tpots),
        "per_output_token_s": tpot,
        "output_tokens_per_s": args.batch_size * args.output_len / summarize(latencies)["mean"],
        **ceilings,
        "decode_bound_context_len": context,
        "decode_bound_s_per_token_batch1": bound,
        "per_token_over_bound_batch1": tpot / bound if tpot and args.batch_size == 1 else None,
        "speculative_decoding": spec,
    }
    report = {**run_metadata("latency", args, config.platform),
              "model": describe_model(model_config), "results": results}
    _print_summary(args, results)
    write_json(args.output_json, report)
    return 0


def _print_summary(args: argparse.Namespace, r: dict) -> None:
    lat = r["latency_s"]
    rows = [("Batch size", args.batch_size), ("Input / output tokens",
                                               f"{args.input_len} / {args.output_len}"),
            ("Iterations", args.num_iters), ("Mean latency (s)", lat["mean"]),
            ("P50 latency (s)", lat["p50"]), ("P90 latency (s)", lat["p90"]),
            ("P99 latency (s)", lat["p99"]),
            ("Output token throughput (tok/s)", r["output_tokens_per_s"]),
            ("Mean TTFT (ms)", 1000 * r["ttft_s"]["mean"])]
    if r["per_output_token_s"] is not None:
        rows.append(("Mean time per output token (ms)", 1000 * r["per_output_token_s"]))
    rows.append(("Decode bound at batch 1 (ms/token)", 1000 * r["decode_bound_s_per_token_batch1"]))
    if r["per_token_over_bound_batch1"] is not None:
        rows.append(("Time per token / bandwidth bound (x)", r["per_token_over_bound_batch1"]))
    print_table("Latency", rows + spec_decode_rows(r["speculative_decoding"]))

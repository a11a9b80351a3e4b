"""``piston bench throughput``: offline generation through ``LLM`` as fast as it goes.

Reports requests/s and input, output and total tokens/s, the achieved model FLOP/s as
a fraction of this machine's matmul peak (measured in the same run), the decode
bandwidth bound, peak memory of the front end and of the engine processes, start-up
time and the time to first token of a cold one-request warm-up.
"""

from __future__ import annotations

import argparse
import os
import time

from piston.bench import (describe_model, print_table, run_metadata, spec_decode_figures, spec_decode_rows,
                          summarize, write_json)
from piston.bench.datasets import add_dataset_args, check_dataset_args, sample_requests


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Dataset, engine and report flags of ``piston bench throughput``."""
    from piston.engine.arg_utils import EngineArgs

    from piston.bench import structured

    add_dataset_args(parser, num_prompts=64)
    EngineArgs.add_cli_args(parser)
    add_report_args(parser)
    structured.add_cli_args(parser)
    parser.add_argument("--disable-tqdm", action="store_true")


def add_report_args(parser: argparse.ArgumentParser) -> None:
    """--output-json and --calibration-seconds, shared by the offline tools."""
    parser.add_argument("--output-json", default=None, help="write every figure to this file")
    parser.add_argument("--calibration-seconds", type=float, default=2.0,
                        help="time spent measuring the matmul peak and memory bandwidth")


def peak_rss_bytes(pid: int, include_children: bool = True) -> int | None:
    """Peak resident memory of process ``pid`` (plus its descendants), summed over the
    processes: the kernel's high-water mark (VmHWM) where readable, else current RSS."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + (root.children(recursive=True) if include_children else [])
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += _high_water_mark(proc)
        except psutil.Error:
            continue
    return total


def _high_water_mark(proc) -> int:
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


def memory_figures(llm) -> dict[str, int | None]:
    """Peak RSS of this front-end process and of the engine process tree (null in-process)."""
    engine_pid = getattr(llm.llm_engine.engine_core, "engine_pid", None)
    in_process = engine_pid is None or engine_pid == os.getpid()
    return {"peak_rss_frontend_bytes": peak_rss_bytes(os.getpid(), include_children=False),
            "peak_rss_engine_bytes": None if in_process else peak_rss_bytes(engine_pid)}


def main(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe; print the summary and write --output-json."""
    from piston import LLM, SamplingParams
    from piston.bench import roofline
    from piston.engine.arg_utils import EngineArgs

    check_dataset_args(args)
    engine_args = EngineArgs.from_cli_args(args)
    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args))
    startup_s = time.perf_counter() - t0
    try:
        requests = sample_requests(args, llm.get_tokenizer())
        greedy = dict(ignore_eos=True, temperature=0.0)
        warm = llm.generate([requests[0].prompt], SamplingParams(max_tokens=1, **greedy),
                            use_tqdm=False)[0]
        params = [SamplingParams(max_tokens=r.expected_output_len, **greedy) for r in requests]
        t0 = time.perf_counter()
        outputs = llm.generate([r.prompt for r in requests], params,
                               use_tqdm=not args.disable_tqdm)
        elapsed = time.perf_counter() - t0
        memory = memory_figures(llm)
        spec = spec_decode_figures(llm.llm_engine.get_stats())
        if getattr(args, "structured_output", None):
            from piston.bench import structured

            constrained = structured.compare(llm, [r.prompt for r in requests],
                                             [r.expected_output_len for r in requests], args)
    finally:
        llm.llm_engine.shutdown()  # idempotent: also on errors
    config, ceilings = roofline.ceilings_after_shutdown(llm, args.dtype, args.calibration_seconds)
    model_config = config.model_config

    prompt_lens = [len(o.prompt_token_ids) for o in outputs]
    output_lens = [len(o.outputs[0].token_ids) for o in outputs]
    results = throughput_figures(model_config.hf_config, model_config.dtype, prompt_lens,
                                 output_lens, elapsed, ceilings)
    results.update(startup_s=startup_s, warmup_ttft_s=_ttft(warm.metrics or {}), **memory,
                   speculative_decoding=spec)
    report = {**run_metadata("throughput", args, config.platform),
              "model": describe_model(model_config), "results": results}
    print_summary("Offline throughput", results)
    if getattr(args, "structured_output", None):
        from piston.bench import structured

        results["structured_output"] = constrained
        print_table("Structured outputs", structured.summary_rows(constrained))
    write_json(args.output_json, report)
    return 0


def _ttft(metrics: dict) -> float | None:
    if "first_token_time" not in metrics or "arrival_time" not in metrics:
        return None
    return metrics["first_token_time"] - metrics["arrival_time"]


def throughput_figures(hf_config, dtype, prompt_lens: list[int], output_lens: list[int],
                       elapsed: float, ceilings: dict[str, float]) -> dict:
    """Rates, roofline fraction and decode bound of a run of these lengths in ``elapsed`` s.

    Shared with the transformers baseline so both are counted the same way.
    """
    from piston.bench import roofline

    n, n_in, n_out = len(prompt_lens), sum(prompt_lens), sum(output_lens)
    flops = roofline.useful_flops(hf_config, prompt_lens, output_lens)
    mean_context = int(n_in / max(n, 1) + n_out / max(n, 1) / 2)
    bound = roofline.decode_bandwidth_bound(hf_config, dtype, ceilings["bandwidth_bytes_per_s"],
                                            mean_context)
    return {
        "num_requests": n, "elapsed_s": elapsed, "input_tokens": n_in, "output_tokens": n_out,
        "requests_per_s": n / elapsed, "input_tokens_per_s": n_in / elapsed,
        "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
        "prompt_len": summarize(prompt_lens), "output_len": summarize(output_lens),
        "useful_flops": flops, "achieved_flops_per_s": flops / elapsed, **ceilings,
        "roofline_fraction": flops / elapsed / ceilings["peak_flops_per_s"],
        "weight_bytes_per_token": roofline.weight_bytes_per_token(hf_config, dtype),
        "decode_bound_context_len": mean_context,
        "decode_bound_s_per_token_batch1": bound,
        "decode_bound_tokens_per_s_batch1": 1.0 / bound,
    }


def print_summary(title: str, r: dict) -> None:
    """The human summary of ``throughput_figures`` (plus start-up and memory when present)."""
    rows = [("Requests", r["num_requests"]), ("Elapsed (s)", r["elapsed_s"]),
            ("Request throughput (req/s)", r["requests_per_s"]),
            ("Input token throughput (tok/s)", r["input_tokens_per_s"]),
            ("Output token throughput (tok/s)", r["output_tokens_per_s"]),
            ("Total token throughput (tok/s)", r["total_tokens_per_s"]),
            ("-- Roofline --", None),
            ("Achieved model GFLOP/s", r["achieved_flops_per_s"] / 1e9),
            ("Matmul peak GFLOP/s (measured)", r["peak_flops_per_s"] / 1e9),
            ("Fraction of matmul peak (%)", 100 * r["roofline_fraction"]),
            ("Memory bandwidth GB/s (measured)", r["bandwidth_bytes_per_s"] / 1e9),
            ("Decode bound at batch 1 (tok/s)", r["decode_bound_tokens_per_s_batch1"])]
    if "startup_s" in r:
        rows += [("-- Start-up and memory --", None), ("Start-up (s)", r["startup_s"])]
    if r.get("warmup_ttft_s") is not None:
        rows.append(("Warm-up TTFT (ms)", 1000 * r["warmup_ttft_s"]))
    for key, label in (("peak_rss_frontend_bytes", "Peak RSS front end (MiB)"),
                       ("peak_rss_engine_bytes", "Peak RSS engine (MiB)")):
        if r.get(key) is not None:
            rows.append((label, r[key] / 2**20))
    print_table(title, rows + spec_decode_rows(r.get("speculative_decoding")))

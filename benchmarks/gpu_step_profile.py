"""Where a batch-1 decode step's time goes on a GPU: torch.profiler over a few engine steps.

    python benchmarks/gpu_step_profile.py --model FOLDER [--mode graphs|eager] [--steps 16] [--top 25]

The engine runs in this process (PISTON_ENGINE_IN_PROCESS=1) so the profiler sees the
runner. One request of 16 random tokens is warmed up, then one decoding ``--steps``
tokens is profiled. Prints the wall time per step, then the ``--top`` operations by
their own host time and by device time, the tables that tell launch overhead (host
time per step above the device's) from kernel time.
"""

from __future__ import annotations

import argparse
import os
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder (config.json; dummy weights)")
    parser.add_argument("--mode", default="graphs", choices=["graphs", "eager"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--platform", default="cuda")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ["PISTON_ENGINE_IN_PROCESS"] = "1"

    import torch
    from piston import LLM, SamplingParams
    from torch.profiler import ProfilerActivity, profile

    kwargs = dict(load_format="dummy", dtype=args.dtype, platform=args.platform, max_model_len=512,
                  max_num_seqs=8, seed=0)
    kwargs.update(enforce_eager=True) if args.mode == "eager" else kwargs.update(compilation_mode="piecewise")
    llm = LLM(model=args.model, **kwargs)
    rng = random.Random(0)
    prompt = [[rng.randrange(1000, 30000) for _ in range(16)]]

    def run(tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - t0

    run(8)
    one, many = run(1), run(1 + args.steps)
    print(f"RESULT profile_{args.mode}_step_ms {(many - one) / args.steps * 1e3:.2f}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run(1 + args.steps)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    if torch.cuda.is_available():
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""cProfile summary of the offline throughput workload, with the engine in this process.

    python benchmarks/profile_engine.py [--num-prompts 64] [--output-len 96] [--top 30]

Prints wall time, then the functions with the most own time, so model compute (linear,
attention) can be told apart from engine overhead (scheduler, runner, sampler, outputs).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-input", type=int, default=32)
    parser.add_argument("--max-input", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    os.environ["PISTON_ENGINE_IN_PROCESS"] = "1"  # profile the engine too

    from piston import LLM, SamplingParams

    llm = LLM(args.model)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(args.min_input, args.max_input))]
               for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    profiler.disable()
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{elapsed:.1f} s, {generated / elapsed:.1f} output tokens/s")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)

    # Model time: the model's forward and logits, wherever they are called from. All
    # the rest of the wall time (scheduler, input preparation, sampler, detokenizer,
    # outputs, the profiler's own cost) is engine overhead.
    from piston.models.llama import LlamaForCausalLM

    model_fns = {(LlamaForCausalLM.forward.__code__.co_filename, LlamaForCausalLM.forward.__code__.co_firstlineno),
                 (LlamaForCausalLM.compute_logits.__code__.co_filename,
                  LlamaForCausalLM.compute_logits.__code__.co_firstlineno)}
    model = sum(entry[3] for (file, line, _), entry in stats.stats.items() if (file, line) in model_fns)
    print(f"model forward + logits {model:.2f} s; engine overhead {elapsed - model:.2f} s "
          f"= {100 * (elapsed - model) / elapsed:.1f}% of wall time (profiler cost included)")


if __name__ == "__main__":
    main()

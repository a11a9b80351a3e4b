"""How far compilation moves a model's log-probabilities: eager against piecewise-compiled.

    python benchmarks/compile_drift.py [--model PATH] [--platform cuda] [--dtype float32]

Runs the same prompts greedily (24 tokens, the top 5 logprobs at every position) through
an ``--enforce-eager`` engine and a ``--compilation-mode piecewise`` one (CUDA graphs where
the platform captures them), and prints, as "RESULT" lines:

- ``drift_max_abs_logprob``: the largest difference in any top-5 token's logprob over the
  positions where both engines chose the same tokens so far;
- ``drift_min_top2_margin``: the smallest gap between the eager engine's two best tokens,
  the margin an exact-greedy test needs to be larger than the drift;
- ``drift_diverged_prompts``: prompts whose greedy tokens differ (each at a position whose
  eager top-2 margin is printed: a divergence inside the drift is rounding, one far outside
  it is a bug).

This settles whether exact greedy can hold on the compiled path: it can where every
reference margin the tests guard exceeds the drift.
"""

from __future__ import annotations

import argparse

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "Q: What is 12 times 7?\nA:",
    "The quick brown fox",
]


def run(model: str | None, mode: str, args: argparse.Namespace):
    from piston import LLM, SamplingParams

    kwargs = dict(dtype=args.dtype, platform=args.platform, max_model_len=1024, seed=0)
    kwargs.update(enforce_eager=True) if mode == "eager" else kwargs.update(compilation_mode="piecewise")
    if args.kv_cache_memory:
        kwargs["kv_cache_memory"] = args.kv_cache_memory
    llm = LLM(model=model, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=5)
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    llm.llm_engine.shutdown()
    return [(list(o.token_ids), [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs]) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    parser.add_argument("--platform", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    args = parser.parse_args()

    eager, compiled = run(args.model, "eager", args), run(args.model, "piecewise", args)
    drift, margin, diverged = 0.0, float("inf"), 0
    for i, ((e_ids, e_lps), (c_ids, c_lps)) in enumerate(zip(eager, compiled)):
        for pos, (e_tok, c_tok) in enumerate(zip(e_ids, c_ids)):
            top = sorted(e_lps[pos].values(), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else float("inf")
            margin = min(margin, gap)
            shared = set(e_lps[pos]) & set(c_lps[pos])
            drift = max([drift] + [abs(e_lps[pos][t] - c_lps[pos][t]) for t in shared])
            if e_tok != c_tok:
                diverged += 1
                print(f"prompt {i} diverges at token {pos}: eager {e_tok}, compiled {c_tok}, "
                      f"eager top-2 margin {gap:.2e}")
                break
    print(f"RESULT drift_max_abs_logprob {drift:.3e}")
    print(f"RESULT drift_min_top2_margin {margin:.3e}")
    print(f"RESULT drift_diverged_prompts {diverged}")


if __name__ == "__main__":
    main()

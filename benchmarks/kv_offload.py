"""Multi-turn chat whose working set is larger than the KV cache, with and without the
prefix cache's offload tiers, in one run.

    python benchmarks/kv_offload.py [--model MODEL] [--kv-cache-memory 256MiB]
        [--conversations 16] [--turns 4] [--offload-size 2GiB] [--disk]

Each round sends the next turn of every conversation together (offline ``LLM.generate``):
the whole history so far plus a new user message of random tokens; the greedy answer joins
the history. By the time a conversation comes back, the other conversations have pushed
its blocks out of the KV cache. Without a tier its history is computed again; with one it
is loaded back. Every engine must give the same tokens (the script asserts it).

Reported per engine: wall time, output tokens/s, time to first token (from the request's
arrival in the front end to its first token there) over the turns after the first, and
the share of prompt tokens served from the cache.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

from piston import LLM, SamplingParams


def run(model: str | None, engine_kwargs: dict, conversations: int, turns: int, user_len: int,
        output_len: int, seed: int) -> dict:
    llm = LLM(model=model, seed=0, dtype="float32", **engine_kwargs)
    vocab = llm.llm_engine.config.model_config.vocab_size
    rng = random.Random(seed)
    histories: list[list[int]] = [[] for _ in range(conversations)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ttfts, cached, prompt_tokens, answers = [], 0, 0, []
    start = time.perf_counter()
    for turn in range(turns):
        prompts = [h + [rng.randrange(100, vocab) for _ in range(user_len)] for h in histories]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for i, out in enumerate(outputs):
            answer = out.outputs[0].token_ids
            answers.append(answer)
            histories[i] = prompts[i] + answer
            if turn:
                ttfts.append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
                cached += out.num_cached_tokens
                prompt_tokens += len(prompts[i])
    wall = time.perf_counter() - start
    llm.llm_engine.shutdown()
    return {"wall_s": wall, "output_tok_s": conversations * turns * output_len / wall,
            "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts),
            "cached_share": cached / prompt_tokens, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--user-len", type=int, default=96)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--offload-size", default="2GiB")
    parser.add_argument("--disk", action="store_true", help="also run with a disk tier only (a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = {"kv_cache_memory": args.kv_cache_memory, "max_model_len": 2048}
    engines = {"no tier": base, f"host tier {args.offload_size}": {**base, "kv_offloading_size": args.offload_size}}
    tmp = tempfile.TemporaryDirectory(prefix="piston-kv-tier-") if args.disk else None
    if tmp is not None:
        engines["disk tier"] = {**base, "kv_offloading_dir": tmp.name}
    results = {name: run(args.model, kw, args.conversations, args.turns, args.user_len, args.output_len, args.seed)
               for name, kw in engines.items()}
    reference = results["no tier"]["answers"]
    for name, r in results.items():
        assert r["answers"] == reference, f"{name}: the greedy answers differ from the run without a tier"

    print(f"{args.conversations} conversations x {args.turns} turns, {args.user_len} new user tokens and "
          f"{args.output_len} output tokens a turn, KV cache {args.kv_cache_memory}; same greedy answers in every run")
    print("| engine | wall (s) | output tok/s | TTFT mean (s) | TTFT p50 (s) | prompt tokens from cache |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['output_tok_s']:.1f} | {r['ttft_mean_s']:.2f} | "
              f"{r['ttft_p50_s']:.2f} | {r['cached_share']:.0%} |")
    base_wall = results["no tier"]["wall_s"]
    for name, r in results.items():
        if name != "no tier":
            print(f"{name}: {base_wall / r['wall_s']:.2f}x the throughput of no tier, TTFT mean "
                  f"{results['no tier']['ttft_mean_s'] / r['ttft_mean_s']:.2f}x lower")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

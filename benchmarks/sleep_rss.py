"""Sleep mode on the CPU platform: the engine process's resident memory before and after
each sleep level, and how long sleeping and waking take.

    python benchmarks/sleep_rss.py [--model MODEL] [--kv-cache-memory 1GiB] [--quantization none]

A warm-up batch first touches the KV cache (64 prompts of 512 random tokens, 16 output
tokens), as a serving engine's cache is touched; the RSS is read from /proc by psutil for
the engine process (the front end holds no weights). After each wake-up the same greedy
request must give the same tokens as before the first sleep.
"""

from __future__ import annotations

import argparse
import random
import time

import psutil

from piston import LLM, SamplingParams


def rss_gib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in default model")
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none",
                        help="none (default): a GGUF's weights dequantized to float32, as an RLHF run holds them")
    args = parser.parse_args()

    llm = LLM(model=args.model, kv_cache_memory=args.kv_cache_memory, dtype=args.dtype, seed=0,
              quantization=args.quantization)
    pid = llm.llm_engine.engine_core.engine_pid
    vocab = llm.llm_engine.config.model_config.vocab_size
    rng = random.Random(0)
    warm = [[rng.randrange(100, vocab) for _ in range(512)] for _ in range(64)]
    llm.generate(warm, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    probe = SamplingParams(temperature=0.0, max_tokens=32)
    expected = llm.generate("The capital of France is", probe, use_tqdm=False)[0].outputs[0].token_ids

    rows = [("awake, KV cache touched", rss_gib(pid), 0.0)]
    for level in (1, 2):
        start = time.perf_counter()
        llm.sleep(level=level)
        rows.append((f"asleep, level {level}", rss_gib(pid), time.perf_counter() - start))
        start = time.perf_counter()
        llm.wake_up()
        woke = time.perf_counter() - start
        got = llm.generate("The capital of France is", probe, use_tqdm=False)[0].outputs[0].token_ids
        assert got == expected, f"level {level}: the output changed after the wake-up"
        rows.append((f"woken from level {level} (same greedy output)", rss_gib(pid), woke))

    print(f"engine pid {pid}, model {args.model or 'default'} (quantization {args.quantization}), "
          f"KV cache {args.kv_cache_memory}, {args.dtype}")
    print(f"| {'state':<44} | RSS (GiB) | call (s) |")
    print(f"|{'-' * 46}|-----------|----------|")
    for state, rss, seconds in rows:
        print(f"| {state:<44} | {rss:9.2f} | {seconds:8.2f} |")
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()

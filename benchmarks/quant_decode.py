"""Batch-1 decode on a GGUF file: Piston (packed weights) against llama.cpp, in one run.

The two engines take turns (Piston, llama.cpp, Piston, ...), each on the same random
prompt of --input-len tokens and asked for --output-len greedy tokens, so both see the
same machine state. Reported: decode time per token after the first (prefill excluded):
Piston from its per-request timestamps, llama.cpp from timing its single-token evals
(each after an argmax over the logits, as greedy sampling needs).

llama.cpp runs through llama-cpp-python in its own virtualenv, never the project's:

    python3 -m venv /tmp/llama-venv
    /tmp/llama-venv/bin/pip install llama-cpp-python   # builds llama.cpp from the sdist (~10 min)
    python benchmarks/quant_decode.py --llama-python /tmp/llama-venv/bin/python

``--float32`` adds Piston with the weights dequantized (--quantization none), and
``--int8-activations`` Piston with PISTON_CPU_QUANT_ACTIVATIONS=int8 (activations of the
decode steps quantized to int8 per 32 values, as llama.cpp does; off by default).
``--kv-cache-dtype float16`` adds Piston with a float16 KV cache: llama.cpp's default KV cache
type is f16, so that is the like-for-like comparison of attention's memory reads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# Run by the llama-cpp-python interpreter: loads the model, then times one decode per line read.
_LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
model, threads, prompt, out_len = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
n_ctx = len(prompt) + out_len + 8  # n_batch as large: llama-cpp-python keeps scores for n_batch positions
llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=max(512, n_ctx),
            verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    llm.reset()
    for token in prompt:  # one at a time: a batched eval segfaults in llama-cpp-python 0.3.36 on AVX-512/AMX CPUs
        llm.eval([token])
    t = time.perf_counter()
    for _ in range(out_len - 1):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    print(json.dumps({"ms_per_token": (time.perf_counter() - t) / (out_len - 1) * 1e3}), flush=True)
"""


def _piston_round(llm, prompt: list[int], out_len: int) -> float:
    from piston import SamplingParams

    params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    m = out.metrics
    return (m["finished_time"] - m["first_token_time"]) / (len(out.outputs[0].token_ids) - 1) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the built-in SmolLM2 Q4_1)")
    parser.add_argument("--llama-python", default="/tmp/llama-venv/bin/python",
                        help="an interpreter with llama-cpp-python installed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("--float32", action="store_true", help="also Piston with dequantized float32 weights")
    parser.add_argument("--int8-activations", action="store_true",
                        help="also Piston with PISTON_CPU_QUANT_ACTIVATIONS=int8")
    parser.add_argument("--kv-cache-dtype", action="append", default=[], choices=["float16", "bfloat16"],
                        help="also Piston with this KV cache dtype (repeatable)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    import os

    os.environ["PISTON_CPU_THREADS"] = str(args.threads)
    from piston import LLM
    from piston.model_resolver import default_model_path

    model = args.model or str(default_model_path())
    prompt = [int(t) for t in __import__("numpy").random.default_rng(0).integers(100, 40000, args.input_len)]
    llama = subprocess.Popen([args.llama_python, "-c", _LLAMA_WORKER, model, str(args.threads), json.dumps(prompt),
                              str(args.output_len)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(llama.stdout.readline())["ready"]
    kw = dict(max_model_len=args.input_len + args.output_len + 16, kv_cache_memory="256MiB", dtype="float32",
              enable_prefix_caching=False)
    engines = {"piston": LLM(model=model, quantization="gguf", **kw)}
    if args.int8_activations:  # read by the engine process when it installs the kernels
        os.environ["PISTON_CPU_QUANT_ACTIVATIONS"] = "int8"
        engines["piston-int8-activations"] = LLM(model=model, quantization="gguf", **kw)
        for name in args.kv_cache_dtype:  # llama.cpp's own pair: int8 activations, a 16-bit cache
            engines[f"piston-int8-activations-kv-{name}"] = LLM(model=model, quantization="gguf",
                                                                 kv_cache_dtype=name, **kw)
        del os.environ["PISTON_CPU_QUANT_ACTIVATIONS"]
    if args.float32:
        engines["piston-float32"] = LLM(model=model, quantization="none", **kw)
    for name in args.kv_cache_dtype:
        engines[f"piston-kv-{name}"] = LLM(model=model, quantization="gguf", kv_cache_dtype=name, **kw)
    times: dict[str, list[float]] = {name: [] for name in [*engines, "llama.cpp"]}
    try:
        for llm in engines.values():  # warm-up
            _piston_round(llm, prompt, 8)
        for r in range(args.rounds):
            for name, llm in engines.items():
                times[name].append(_piston_round(llm, prompt, args.output_len))
            llama.stdin.write("go\n")
            llama.stdin.flush()
            times["llama.cpp"].append(json.loads(llama.stdout.readline())["ms_per_token"])
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f} ms/token" for n, v in times.items()), flush=True)
    finally:
        llama.stdin.close()
        llama.wait()
        for llm in engines.values():
            llm.llm_engine.shutdown()
    medians = {n: statistics.median(v) for n, v in times.items()}
    print(f"\nmedian ms/token over {args.rounds} rounds ({args.threads} threads, prompt {args.input_len}, "
          f"{args.output_len} tokens): " + ", ".join(f"{n} {v:.2f}" for n, v in medians.items()))
    for name in engines:
        print(f"{name} / llama.cpp = {medians[name] / medians['llama.cpp']:.3f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": model, "args": vars(args), "ms_per_token": times, "median": medians,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

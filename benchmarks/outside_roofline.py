"""The throughput roofline measured the way an outsider would, next to `piston bench throughput`.

    python benchmarks/outside_roofline.py --model /path/to/hf-folder [--bench-model MODEL ...]

The outside measure uses only the public API and its own arithmetic, nothing from
piston.bench:

- work: FLOPs counted from the model's config.json: q/k/v/o projections and the gate/up/
  down MLP (2 x weights per token position), causal attention (QK^T and PV: 4 x heads x
  head_dim per query-key pair), and the lm_head for sampled positions only;
- peak: the best of repeated 2048 x 2048 float32 `torch.matmul` calls in this process,
  before the engine starts and again after it stops (both are printed; the fraction uses
  the larger, the stricter);
- run: `LLM(model=..., dtype="float32")` with default settings, 64 prompts of uniformly
  random lengths 32-256 made of random token ids, 96 output tokens each (`ignore_eos`),
  timed around `generate`.

Then, in the same process state, `piston bench throughput` runs as a subprocess on each
``--bench-model`` (default: the same folder, and the built-in default model) with the same
lengths and seed, and its own printed roofline is shown beside the outside one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def matmul_peak(seconds: float = 3.0, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def run_flops(config: dict, prompt_lens: list[int], output_len: int) -> float:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    weights = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter
    total = 0.0
    for p in prompt_lens:
        positions = p + output_len - 1  # the last sampled token is never fed back
        total += 2 * weights * layers * positions
        total += 4 * heads * head_dim * layers * positions * (positions + 1) / 2  # causal pairs
        total += 2 * hidden * vocab * output_len  # logits of the sampled positions only
    return total


def outside_run(args) -> dict:
    import numpy as np
    from piston import LLM, SamplingParams

    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    rng = np.random.default_rng(args.seed)
    prompt_lens = [int(x) for x in rng.integers(32, 257, size=args.num_prompts)]
    special = {config.get("bos_token_id"), config.get("eos_token_id"), config.get("pad_token_id")}
    prompts = []
    for n in prompt_lens:
        ids = rng.integers(100, config["vocab_size"] - 100, size=n).tolist()
        prompts.append([t for t in ids if t not in special] or [100])
    prompt_lens = [len(p) for p in prompts]

    peak_before = matmul_peak(args.calibration_seconds)
    llm = LLM(model=args.model, dtype="float32")
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    warm = [rng.integers(100, config["vocab_size"] - 100, size=64).tolist() for _ in range(2)]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    del llm
    import gc

    gc.collect()
    time.sleep(2)  # the engine process exits
    peak_after = matmul_peak(args.calibration_seconds)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    flops = run_flops(config, prompt_lens, args.output_len)
    peak = max(peak_before, peak_after)
    return {"elapsed_s": elapsed, "output_tok_per_s": generated / elapsed, "flops": flops,
            "peak_before": peak_before, "peak_after": peak_after,
            "fraction": flops / elapsed / peak, "prompt_lens": prompt_lens}


def bench_run(model: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = ["piston", "bench", "throughput", "--num-prompts", str(args.num_prompts), "--input-len", "144",
           "--range-ratio", "0.78", "--output-range-ratio", "0", "--output-len", str(args.output_len),
           "--output-json", out]
    if model != "default":
        cmd += ["--model", model]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        report = json.load(f)
    os.unlink(out)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face folder (config.json + safetensors)")
    parser.add_argument("--bench-model", nargs="*", default=None,
                        help="models for `piston bench throughput` ('default': the built-in one); "
                             "default: --model and 'default'")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-seconds", type=float, default=3.0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    outside = outside_run(args)
    print(f"outside: {outside['elapsed_s']:.2f} s, {outside['output_tok_per_s']:.1f} output tok/s, "
          f"{outside['flops'] / 1e12:.3f} TFLOP; matmul peak {outside['peak_before'] / 1e9:.1f} GFLOP/s before, "
          f"{outside['peak_after'] / 1e9:.1f} after; fraction of peak {outside['fraction']:.3f}")
    results = {"outside": {k: v for k, v in outside.items() if k != "prompt_lens"}, "bench": {}}
    for model in args.bench_model if args.bench_model is not None else [args.model, "default"]:
        report = bench_run(model, args)
        r = report["results"]
        lens = report.get("settings", {})
        print(f"piston bench throughput ({model}): {r['elapsed_s']:.2f} s, {r['output_tokens_per_s']:.1f} "
              f"output tok/s, matmul peak {r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, "
              f"fraction of peak {r['roofline_fraction']:.3f}")
        results["bench"][model] = {"results": r, "settings": lens}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

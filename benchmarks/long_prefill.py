"""One long prompt's prefill against the matmul peak, measured from outside.

    python benchmarks/long_prefill.py --model /path/to/hf-folder [--tokens 7000]

Times ``LLM(model=..., dtype="float32").generate`` on one prompt of --tokens random ids with
``max_tokens=1`` (the default scheduler cuts it into 2048-token steps), after a short
warm-up request. Work: the FLOPs of the projections and MLP (2 x weights per token),
causal attention (4 x heads x head_dim per query-key pair) and one lm_head row, counted from
config.json. Peak: the best 2048 x 2048 float32 ``torch.matmul`` in this process before and
after the run (the larger is used).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outside_roofline import matmul_peak  # noqa: E402


def prefill_flops(config: dict, tokens: int) -> tuple[float, float]:
    """(all FLOPs, attention's) of a prefill of ``tokens`` tokens and one sampled row."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    per_token = 2 * layers * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter)
    attention = 4 * heads * head_dim * layers * tokens * (tokens + 1) / 2
    return per_token * tokens + attention + 2 * hidden * config["vocab_size"], attention


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face folder (config.json + safetensors)")
    parser.add_argument("--tokens", type=int, default=7000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from piston import LLM, SamplingParams

    peak_before = matmul_peak()
    llm = LLM(model=args.model, dtype="float32")
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    rng = random.Random(args.seed)
    prompt = [rng.randrange(100, config["vocab_size"] - 100) for _ in range(args.tokens)]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([prompt[:64]], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    peak_after = matmul_peak()
    flops, attention = prefill_flops(config, args.tokens)
    peak = max(peak_before, peak_after)
    print(f"{args.tokens}-token prefill: {elapsed:.2f} s, {flops / 1e12:.3f} TFLOP "
          f"(attention {attention / flops:.0%}); "
          f"matmul peak {peak_before / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after; "
          f"fraction of peak {flops / elapsed / peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

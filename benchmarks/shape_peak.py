"""The matmul rate at the model's own shapes, against the square 2048 matmul peak.

    python benchmarks/shape_peak.py [--model PATH] [--rows 1 8 64 256 512 2048]

For every linear map of one decoder layer (q, k, v, o, gate, up, down) and the lm_head, and
every row count M given, the best time of ``torch.nn.functional.linear`` on float32 with
fresh (cold) weights, as GFLOP/s and as a fraction of the best 2048 x 2048 ``torch.matmul``
timed in the same process just before. The rows of a layer are also given weighted by
FLOPs, which is the rate a prefill or decode step of M rows can reach through torch's GEMM
at best. Piston's own small-batch kernel (rows up to 512) is not measured here; see
benchmarks/gemv_bandwidth.py for it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def best_time(fn, seconds: float) -> float:
    fn()
    best, deadline, runs = float("inf"), time.perf_counter() + seconds, 0
    while runs < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def cycling_linear(x: torch.Tensor, weights: list[torch.Tensor]):
    """A call of F.linear on ``x`` with the next of ``weights`` each time."""
    state = {"i": 0}

    def call() -> None:
        state["i"] = (state["i"] + 1) % len(weights)
        torch.nn.functional.linear(x, weights[state["i"]])

    return call


def shapes(config: dict) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of one layer's linear maps and the lm_head."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return [("q", hidden, heads * head_dim), ("k", hidden, kv_heads * head_dim),
            ("v", hidden, kv_heads * head_dim), ("o", heads * head_dim, hidden),
            ("gate", hidden, inter), ("up", hidden, inter), ("down", inter, hidden),
            ("lm_head", hidden, config["vocab_size"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a folder with config.json (default: SmolLM2-135M's shapes)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--seconds", type=float, default=0.5, help="timing per shape")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            config = json.load(f)
    else:
        config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    peak = 2 * n ** 3 / best_time(lambda: torch.matmul(a, b), 3.0)
    print(f"torch threads {torch.get_num_threads()}; 2048 x 2048 matmul peak {peak / 1e9:.1f} GFLOP/s")
    results = {"peak_flops_per_s": peak, "rows": {}}
    names = " ".join(f"{name:>8}" for name, *_ in shapes(config))
    print(f"{'rows':>6} {names} {'layer':>8}  (fraction of peak)")
    for m in args.rows:
        row, layer_flops, layer_time = {}, 0.0, 0.0
        for name, k, nout in shapes(config):
            # A fresh weight per timing call would measure allocation; several copies cycled
            # keep the weights out of the caches, as in a model's forward.
            copies = max(2, int(64 * 2**20 // (4 * k * nout)) + 1)
            t = best_time(cycling_linear(torch.randn(m, k), [torch.randn(nout, k) for _ in range(min(copies, 16))]),
                          args.seconds)
            flops = 2 * m * k * nout
            row[name] = flops / t / peak
            if name != "lm_head":
                layer_flops += flops
                layer_time += t
        row["layer"] = layer_flops / layer_time / peak
        results["rows"][m] = row
        print(f"{m:>6} " + " ".join(f"{row[name]:>8.2f}" for name, *_ in shapes(config)) + f" {row['layer']:>8.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

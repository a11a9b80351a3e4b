"""How fast SmolLM2-135M's weights stream through small-batch matrix products.

    python benchmarks/gemv_bandwidth.py [--rows 1 8 32 64 128] [--passes 5]

Runs every linear layer of the model once per pass (random weights of the real shapes,
float32, 538 MB: far more than the caches) with x of ``rows`` rows, through torch's
F.linear and through Piston's CPU kernel (``piston_cpu.kernels``), alternating, and
prints the best ms per pass, the weight bytes per second and the FLOP rate of each. At
one row this is the floor under `piston bench latency`; the same run also measures the
machine's streaming read rate (``roofline.calibrate_bandwidth``) for comparison.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# (out, in) of qkv, o, gate_up and down in each of the 30 layers, then the tied lm_head.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()

    from piston.bench.roofline import calibrate_bandwidth
    from piston_cpu import kernels

    ops = kernels.load()
    torch.manual_seed(0)
    weights = [torch.randn(s) for s in SHAPES]
    total_bytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"threads {torch.get_num_threads()}, {len(weights)} matrices, {total_bytes / 1e6:.0f} MB; "
          f"streaming read rate {calibrate_bandwidth() / 1e9:.1f} GB/s")
    for rows in args.rows:
        inputs = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
        fns = {"torch": lambda w, x=inputs: F.linear(x[w.shape[1]], w)}
        if ops is not None:
            fns["piston"] = lambda w, x=inputs: ops.linear(x[w.shape[1]], w)
        best = {name: float("inf") for name in fns}
        for _ in range(args.passes):
            for name, fn in fns.items():
                start = time.perf_counter()
                for w in weights:
                    fn(w)
                best[name] = min(best[name], time.perf_counter() - start)
        line = "  ".join(f"{name} {t * 1e3:6.1f} ms {total_bytes / t / 1e9:5.1f} GB/s "
                         f"{rows * total_bytes / 2 / t / 1e9:4.0f} GFLOP/s" for name, t in best.items())
        ratio = f"  torch/piston {best['torch'] / best['piston']:.2f}x" if "piston" in best else ""
        print(f"rows {rows:4d}: {line}{ratio}")


if __name__ == "__main__":
    main()

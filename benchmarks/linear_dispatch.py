"""Where Piston's C++ linear beats torch's GEMM on the CPU: time ratios by rows of x.

    python benchmarks/linear_dispatch.py [--shapes 960x576 576x1536 ...] [--rows 1 8 16 ...]

For each weight shape (out x in), 30 distinct random float32 matrices (as many as a model's
layers, so they stream from memory rather than sit in cache) are multiplied with x of each
row count, through the C++ kernel (``piston_cpu.kernels``) and through ``F.linear``; the
best of three passes of each is kept and the ratio kernel/torch printed (below 1: the
kernel is faster). ``piston_cpu.layer_kernels.kernel_rows`` encodes the crossovers.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["960x576", "576x576", "3072x576", "576x1536", "256x1536"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from piston_cpu.kernels import load

    ops = load()
    if ops is None:
        raise SystemExit("the C++ kernels could not be built here")
    torch.set_num_threads(args.threads)

    def best_pass(fn, x, weights) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for w in weights:
                fn(x, w)
            best = min(best, time.perf_counter() - t0)
        return best

    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        weights = [torch.randn(n, k) for _ in range(30)]
        ratios = []
        for m in args.rows:
            x = torch.randn(m, k)
            kernel, reference = (lambda a, w: ops.linear(a, w, None)), (lambda a, w: F.linear(a, w))
            best_pass(kernel, x, weights[:2]), best_pass(reference, x, weights[:2])  # warm-up
            ratios.append(f"{m}:{best_pass(kernel, x, weights) / best_pass(reference, x, weights):.2f}")
        print(f"{n}x{k} (out x in) kernel/torch by rows: " + " ".join(ratios), flush=True)


if __name__ == "__main__":
    main()

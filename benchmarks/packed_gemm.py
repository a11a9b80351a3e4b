"""The CPU platform's float32 linear paths on SmolLM2's shapes, as fractions of the matmul peak.

    python benchmarks/packed_gemm.py [--rows 1 4 13 16 32 64 128 256 512] [--threads 2]
    PISTON_CPU_ISA=avx2 python benchmarks/packed_gemm.py   # the AVX2 build (16-column blocks)

For each of SmolLM2's weight shapes (q/k/v, o, gate/up, down, the LM head) it times, on
distinct random matrices streamed from memory as a step's layers are (best of three passes):
- torch's GEMM (``F.linear``), which packs the weight on every call;
- Piston's packed GEMM (``packed_linear`` over ``pack_linear_weight``'s copy, what the
  engine runs for float32 weights; csrc/packed_gemm.cpp);
- Piston's row-streaming linear (``linear``, cpu_kernels.cpp), up to 256 rows;
each as model FLOPs over time over the best 2048 x 2048 ``torch.mm`` rate timed in this
process (above 1.0: faster than torch's square matmul). Results are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # out x in


def best(fn, items, passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 13, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platforms", "cpu"))
    from piston_cpu import kernels

    ops = kernels.load()
    if ops is None:
        raise SystemExit("Piston's CPU kernels are unavailable here (see the log line above).")
    torch.set_num_threads(args.threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = max(2 * 2048**3 / best(lambda w: torch.mm(a, w), [b]) for _ in range(3)) / 1e9
    print(f"{kernels.isa()} build, packed blocks of {ops.packed_gemm_width()} columns; matmul peak {peak:.0f} "
          f"GFLOP/s, {args.threads} threads. Fractions of it: torch / packed / row-streaming")
    for n, k in SHAPES:
        count = 30 if n < 10000 else 3  # about 60 MB or more of weights a pass: past the L3
        weights = [torch.randn(n, k) for _ in range(count)]
        packed = [ops.pack_linear_weight(w) for w in weights]
        cells = []
        for m in args.rows:
            x = torch.randn(m, k)
            flops = 2 * m * n * k * count / 1e9
            t_torch = best(lambda w, x=x: F.linear(x, w), weights)
            t_packed = best(lambda p, x=x, n=n: ops.packed_linear(x, p, n), packed)
            t_row = best(lambda w, x=x: ops.linear(x, w, None), weights) if m <= 256 else None
            row = "-" if t_row is None else f"{flops / t_row / peak:.2f}"
            cells.append(f"{m}: {flops / t_torch / peak:.2f} / {flops / t_packed / peak:.2f} / {row}")
        print(f"{n} x {k}:  " + " | ".join(cells))


if __name__ == "__main__":
    main()

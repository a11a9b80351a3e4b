"""Would weights packed once at load make the CPU's float32 GEMM faster at decode-sized batches?

    python benchmarks/prepacked_gemm.py [--rows 16 64 128 256 512]

Torch's GEMM packs W on every call. Two ways to pack it once, against ``F.linear``, on
SmolLM2's layer shapes (30 distinct random matrices per shape, so they stream from memory as
a step's layers do; best of three passes), as fractions of the 2048 x 2048 ``torch.mm`` peak
timed in the same process:
- oneDNN's packed weight (``torch.ops.mkldnn._reorder_linear_weight`` and
  ``_linear_pointwise``, what Inductor's freezing uses), packed for the batch's row count;
- a plain AVX-512 kernel over W packed 32 output columns at a time
  (``benchmarks/prepacked_gemm.cpp``, built here with torch's extension builder), holding
  MR rows of x by 32 columns in registers, for MR = 8, 12 and 14; and with MR = 12 asking for
  the next block of W while the first rows meet this one.

Needs an AVX-512 CPU for the second. Results are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2's qkv, o, gate_up, down (out x in)
MRS = (8, 12, 14)


def best(fn, weights, passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from torch.utils.cpp_extension import load

    ext = load("piston_prepacked_gemm", [os.path.join(os.path.dirname(__file__), "prepacked_gemm.cpp")],
               extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp"])
    torch.set_num_threads(args.threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = max(2 * 2048**3 / best(lambda w: torch.mm(a, w), [b]) for _ in range(3)) / 1e9
    print(f"matmul peak {peak:.0f} GFLOP/s, {args.threads} threads; fractions of it:")
    for n, k in SHAPES:
        weights = [torch.randn(n, k) for _ in range(30)]
        packed = [ext.pack(w) for w in weights]
        cells = []
        for m in args.rows:
            x = torch.randn(m, k)
            onednn = [torch.ops.mkldnn._reorder_linear_weight(w, m) for w in weights]
            expected = F.linear(x, weights[0])
            for mr in MRS:
                got = ext.gemm(x, packed[0], n, mr, True)
                assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), "the packed kernel is wrong"
            flops = 2 * m * n * k * len(weights) / 1e9
            rates = {"F.linear": flops / best(lambda w, x=x: F.linear(x, w), weights),
                     "oneDNN": flops / best(lambda w, x=x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [],
                                                                                              ""), onednn)}
            for mr in MRS:
                rates[f"MR={mr}"] = flops / best(lambda w, x=x, n=n, mr=mr: ext.gemm(x, w, n, mr, False), packed)
            rates["MR=12+prefetch"] = flops / best(lambda w, x=x, n=n: ext.gemm(x, w, n, 12, True), packed)
            cells.append(f"{m}: " + " ".join(f"{name} {rate / peak:.2f}" for name, rate in rates.items()))
        print(f"{n}x{k}  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""The packed linear kernel alone on a GGUF model's weights: every packed matrix once per pass.

Loads the model's weights packed (default: the built-in SmolLM2 Q4_1 GGUF, whose linears are
Q4_1 and whose tied LM head is Q8_0) and times ``qlinear`` over all the linears in a row at
1, 2, 4 and 8 rows of x, as a decode step meets them (their 66 MB stream from memory: no
matrix is hot when its turn comes), then the LM head alone, then one 960 x 576 matrix over
and over (hot in L2). Reports the best and median pass and the packed bytes per second.

    python benchmarks/packed_gemv.py                       # the build for this CPU
    PISTON_CPU_ISA=avx2 python benchmarks/packed_gemv.py   # the 8-wide build, on an AVX-512 CPU
    python benchmarks/packed_gemv.py --int8-activations    # x quantized to int8 (up to 8 rows)
"""

from __future__ import annotations

import argparse
import time

import torch


def _passes(fn, n: int) -> list[float]:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the built-in SmolLM2 Q4_1)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8-activations", action="store_true",
                        help="x quantized to int8 per 32 values (PISTON_CPU_QUANT_ACTIVATIONS=int8's path)")
    args = parser.parse_args()

    from piston.model_resolver import default_model_path
    from piston.models.layers.quantized import PackedWeight
    from piston.models.loader import load_model
    from piston.step.config import ModelConfig
    from piston_cpu import kernels

    torch.set_num_threads(args.threads)
    ops = kernels.load()
    if ops is None:
        raise SystemExit("Piston's CPU kernels are not available here (see the log).")
    model = load_model(ModelConfig(model=args.model or default_model_path(), dtype="float32", quantization="auto"))
    packed = [m for m in model.modules() if isinstance(m, PackedWeight) and m.loaded]
    head = max(packed, key=lambda p: p.out_features)
    linears = [p for p in packed if p is not head]
    isa = kernels.isa() if hasattr(kernels, "isa") else "avx2 (before PISTON_CPU_ISA)"
    print(f"kernels built for {isa}; {len(linears)} linears and the LM head "
          f"({head.out_features} x {head.in_features}), {args.threads} threads, "
          f"{'int8' if args.int8_activations else 'float32'} activations")
    for rows in args.rows:
        xs = {p.in_features: torch.randn(rows, p.in_features) for p in packed}

        def run(weights, xs=xs):
            for p in weights:
                ops.qlinear(xs[p.in_features], p.segments, p.codes, None, args.int8_activations)

        hot = [p for p in linears if (p.out_features, p.in_features) == (960, 576)][:1] or linears[:1]
        for name, weights, n in (("linears", linears, args.passes), ("LM head", [head], args.passes),
                                 (f"one {hot[0].out_features}x{hot[0].in_features}, hot", hot * 50, 5)):
            times = _passes(lambda w=weights: run(w), n)
            nbytes = sum(s.numel() for p in weights for s in p.segments)
            best, median = times[0], times[len(times) // 2]
            per = len(weights) if name.endswith("hot") else 1
            print(f"{rows} rows, {name}: best {best / per * 1e3:.3f} ms, median {median / per * 1e3:.3f} ms, "
                  f"{nbytes / best / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

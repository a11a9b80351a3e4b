"""The greedy LM head (platforms/cpu/piston_cpu/csrc/greedy_head.cpp) against the logits it
replaces: for each shape and row count, the best of three passes of five calls of

  - the screen with x as int8 (``planes=1``) and as int16 (``planes=2``);
  - the packed GEMM's logits (what a greedy step computed before) and the C++ argmax over them;

and the float32 dot products the screen computed per row (its candidates). Weights: the
engine's dummy weights (uniform +-1e-3), x standard normal. Real hidden states have outlier
channels: there int8 x leaves many more candidates (benchmarks/RESULTS.md, 2026-12-06,
"the greedy LM head").

    python benchmarks/greedy_head.py                       # the tiny model's head (49152 x 256)
    python benchmarks/greedy_head.py --hidden 576          # SmolLM2's head shape
"""

from __future__ import annotations

import argparse
import time

import torch


def best_ms(fn, passes: int = 3, calls: int = 5) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    args = parser.parse_args()

    from piston_cpu import kernels

    ops = kernels.load()
    if ops is None:
        raise SystemExit("Piston's CPU kernels are unavailable here.")
    torch.manual_seed(0)
    w = torch.empty(args.vocab, args.hidden).uniform_(-1e-3, 1e-3)
    prepared, packed = ops.greedy_head_prepare(w), ops.pack_linear_weight(w)
    print(f"head {args.vocab} x {args.hidden}, screen with {'VNNI' if ops.greedy_head_fast() else 'scalar code'}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'rows':>5s} {'int8 x ms':>10s} {'int16 x ms':>11s} {'logits+argmax ms':>17s} {'ratio int8':>11s} "
          f"{'ratio int16':>12s} {'cand/row 8/16':>14s}")
    for rows in args.rows:
        x = torch.randn(rows, args.hidden)
        want = (x @ w.T).argmax(-1)
        counts = []
        for planes in (1, 2):
            stats = torch.zeros(3, dtype=torch.int64)
            assert torch.equal(ops.greedy_head_argmax(x, w, prepared, stats, planes=planes), want)
            counts.append(stats[1].item() / rows)
        t8 = best_ms(lambda x=x: ops.greedy_head_argmax(x, w, prepared, planes=1))
        t16 = best_ms(lambda x=x: ops.greedy_head_argmax(x, w, prepared, planes=2))
        tl = best_ms(lambda x=x: ops.argmax_rows(ops.packed_linear(x, packed, args.vocab)))
        print(f"{rows:5d} {t8:10.2f} {t16:11.2f} {tl:17.2f} {tl / t8:11.2f} {tl / t16:12.2f} "
              f"{counts[0]:6.1f}/{counts[1]:.1f}")


if __name__ == "__main__":
    main()

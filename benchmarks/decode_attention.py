"""The CPU paged-attention kernel alone on decode rows: microseconds per layer call.

Each case builds `--layers` separate K/V caches (random float32, block size 16) and times one
`paged_attention` call per layer in a row, as a decode step makes them (with 30 layers the
K/V of a long context streams from memory; with 1 it stays in cache), then reports the
median pass per layer and the K/V bytes per second it implies. Default cases: SmolLM2's
heads (9 query, 3 KV, 64 wide) at batch 1 over 256 to 4,096 tokens and at 64 rows of 200,
and the tiny benchmark model's (4 query, 2 KV) at 256 rows of 192.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --case 9,3,64,1,4096 --layers 1
    python benchmarks/decode_attention.py --kv-cache-dtype float32 --kv-cache-dtype float16

With several `--kv-cache-dtype`, each case runs with each cache dtype one after the other.
"""

from __future__ import annotations

import argparse
import time

import torch

CASES = ["9,3,64,1,256", "9,3,64,1,1024", "9,3,64,1,4096", "9,3,64,64,200", "4,2,64,256,192"]


def time_case(ops, heads: int, kv_heads: int, head_dim: int, rows: int, ctx: int, layers: int,
              passes: int = 7, block_size: int = 16, dtype: torch.dtype = torch.float32) -> float:
    blocks_per_row = ctx // block_size + 2
    num_blocks = rows * blocks_per_row
    caches = [(torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype),
               torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)) for _ in range(layers)]
    block_table = torch.arange(num_blocks, dtype=torch.int32).view(rows, blocks_per_row)
    q, k, v = torch.randn(rows, heads * head_dim), torch.randn(rows, kv_heads * head_dim), torch.randn(
        rows, kv_heads * head_dim)
    slots = torch.arange(rows, dtype=torch.int64) * blocks_per_row * block_size + ctx - 1
    seq_idx = torch.arange(rows, dtype=torch.int32)
    ctx_lens = torch.full((rows,), ctx, dtype=torch.int32)

    def run():
        for key_cache, value_cache in caches:
            ops.paged_attention(q, k, v, key_cache, value_cache, slots, block_table, seq_idx, ctx_lens, heads,
                                head_dim ** -0.5, 0)

    run()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[passes // 2] / layers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="heads,kv_heads,head_dim,rows,context (repeatable)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-dtype", action="append", choices=["float32", "float16", "bfloat16"],
                        help="the caches' dtype (repeatable; default float32)")
    args = parser.parse_args()
    from piston_cpu import kernels

    torch.set_num_threads(args.threads)
    ops = kernels.load()
    if ops is None:
        raise SystemExit("Piston's CPU kernels are not available here (see the log).")
    for case in args.case or CASES:
        heads, kv_heads, head_dim, rows, ctx = (int(x) for x in case.split(","))
        for name in args.kv_cache_dtype or ["float32"]:
            dtype = getattr(torch, name)
            per = time_case(ops, heads, kv_heads, head_dim, rows, ctx, args.layers, dtype=dtype)
            kv_bytes = rows * ctx * kv_heads * head_dim * dtype.itemsize * 2
            print(f"{heads} heads ({kv_heads} KV, {head_dim} wide), {rows} rows of {ctx} tokens, {args.layers} "
                  f"layers, {name} cache: {per * 1e6:.0f} us a layer, {kv_bytes / per / 1e9:.1f} GB/s of K/V")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

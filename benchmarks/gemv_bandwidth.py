"""How fast torch streams SmolLM2-135M's weights through batch-1 matrix-vector products.

    python benchmarks/gemv_bandwidth.py

Runs every linear layer of the model once per pass (random weights of the real shapes,
float32) through F.linear, torch.mv and torch.matmul, and prints ms per pass and GB/s.
This is the floor under `piston bench latency` at batch 1.
"""

import time

import torch
import torch.nn.functional as F

# (out, in) of qkv, o, gate_up and down in each of the 30 layers, then the tied lm_head.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(s) for s in SHAPES]
    inputs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
    total_bytes = sum(w.numel() * w.element_size() for w in weights)

    def linear():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    def mv():
        for w in weights:
            torch.mv(w, inputs[w.shape[1]][0])

    def matmul():
        for w in weights:
            torch.matmul(inputs[w.shape[1]], w.t())

    for fn in (linear, mv, matmul, linear, mv, matmul):
        fn()  # warm up
        start = time.perf_counter()
        for _ in range(10):
            fn()
        per_pass = (time.perf_counter() - start) / 10
        print(f"{fn.__name__:7s} {per_pass * 1000:6.1f} ms per pass  {total_bytes / per_pass / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()

"""How fast torch streams SmolLM2-135M's weights through batch-1 matrix-vector products.

    python benchmarks/gemv_bandwidth.py

Runs every linear layer of the model once per pass (random weights of the real shapes,
float32) through F.linear, torch.mv and torch.matmul, and prints ms per pass and GB/s.
This is the floor under `piston bench latency` at batch 1.
"""
import torch, time
import torch.nn.functional as F
torch.manual_seed(0)
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
Ws = [torch.randn(s) for s in shapes]
x = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
def lin():
    for W in Ws: F.linear(x[W.shape[1]], W)
def mv():
    for W in Ws: torch.mv(W, x[W.shape[1]][0])
def mm():
    for W in Ws: torch.matmul(x[W.shape[1]], W.t())
for f in (lin, mv, mm, lin, mv, mm):
    f(); t=time.perf_counter()
    for _ in range(10): f()
    dt=(time.perf_counter()-t)/10
    print(f.__name__, f"{dt*1000:.1f} ms", f"{sum(W.numel()*4 for W in Ws)/dt/1e9:.1f} GB/s")

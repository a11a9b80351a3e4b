"""How close a run comes to what this machine can do.

Two ceilings are measured in the same run: the dense matmul peak (FLOP/s), which
bounds prefill and large batches, and streamed-weight bandwidth (bytes/s), which
bounds decoding at small batch, where every step reads all the weights once. The
model's useful work is counted from its config, so padding or recomputation by an
engine never counts as work done.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from piston.bench import engine_threads
from piston.step.config import hf_head_dim, hf_num_kv_heads

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return _DTYPES[dtype] if isinstance(dtype, str) else dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, seconds: float, min_runs: int = 3) -> float:
    """The fastest of repeated calls of ``fn`` (after one warm-up), run for ~``seconds``."""
    fn()
    _sync(device)
    best, runs, deadline = float("inf"), 0, time.perf_counter() + seconds
    while runs < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def calibrate_matmul_peak(dtype: str | torch.dtype = "float32", seconds: float = 2.0,
                          n: int = 2048, device: str = "cpu") -> float:
    """This machine's dense matmul rate in FLOP/s: the best of repeated n x n torch.mm,
    with torch using as many threads as the engine does."""
    dev = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(engine_threads())
    try:
        a = torch.randn(n, n, dtype=_as_dtype(dtype), device=dev)
        b = torch.randn(n, n, dtype=_as_dtype(dtype), device=dev)
        out = torch.empty(n, n, dtype=_as_dtype(dtype), device=dev)
        best = _best_time(lambda: torch.mm(a, b, out=out), dev, seconds)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * n ** 3 / best


def calibrate_bandwidth(nbytes: int = 512 << 20, seconds: float = 1.0,
                        device: str = "cpu") -> float:
    """Streamed read bandwidth in bytes/s over ``nbytes`` of float32 (far larger than any
    cache): the best of a matrix-vector product (``torch.mv``, what a naive decode step
    does) and a dot product of the buffer's two halves (a pure streaming read, which
    reaches about twice mv's rate on the CPU here). The faster of the two is what this
    machine can read, so the decode bound uses it even when an engine's GEMV is slower."""
    dev = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(engine_threads())
    try:
        cols = 4096
        rows = max(2, nbytes // (4 * cols))
        w = torch.full((rows, cols), 0.5, dtype=torch.float32, device=dev)  # randn is slow here
        x = torch.randn(cols, dtype=torch.float32, device=dev)
        y = torch.empty(rows, dtype=torch.float32, device=dev)
        flat = w.view(-1)
        half = flat.numel() // 2
        mv = _best_time(lambda: torch.mv(w, x, out=y), dev, seconds / 2)
        dot = _best_time(lambda: torch.dot(flat[:half], flat[half:2 * half]), dev, seconds / 2)
    finally:
        torch.set_num_threads(previous)
    return w.numel() * 4 / min(mv, dot)


def _shape(hf_config) -> tuple[int, int, int, int, int, int, int]:
    return (hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers,
            hf_config.num_attention_heads, hf_num_kv_heads(hf_config), hf_head_dim(hf_config),
            hf_config.vocab_size)


def linear_params_per_layer(hf_config) -> int:
    """Weights of one decoder layer's linear maps: q, k, v, o, gate, up, down."""
    hidden, inter, _, heads, kv_heads, head_dim, _ = _shape(hf_config)
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    return attn + 3 * hidden * inter


def model_flops_per_token(hf_config, context_len: int, with_lm_head: bool = True) -> int:
    """FLOPs of one token's forward pass that attends to ``context_len`` keys (itself
    included): 2 * linear weights per layer, 2 * 2 * heads * head_dim * context_len per
    layer for QK^T and PV, and 2 * hidden * vocab for the lm_head when its logits are
    computed. Norms, rotary embeddings and activations are left out (< 1%)."""
    hidden, _, layers, heads, _, head_dim, vocab = _shape(hf_config)
    per_layer = 2 * linear_params_per_layer(hf_config) + 4 * heads * head_dim * context_len
    return layers * per_layer + (2 * hidden * vocab if with_lm_head else 0)


def useful_flops(hf_config, prompt_lens, output_lens) -> float:
    """FLOPs a run must do, without padding or recomputation: every prompt token with its
    causal context, every fed-back generated token with its growing context, and the
    lm_head once per generated token (prompt positions compute no logits).

    A request of P prompt and O output tokens runs P + O - 1 token positions (the last
    sampled token is never fed back) with contexts 1 .. P + O - 1. Prefix-cache hits are
    counted as work, so a cache-heavy run can exceed the matmul peak.
    """
    hidden, _, layers, heads, _, head_dim, vocab = _shape(hf_config)
    linear = 2 * layers * linear_params_per_layer(hf_config)
    attn_per_key = 4 * layers * heads * head_dim
    total = 0.0
    for p, o in zip(prompt_lens, output_lens):
        positions = p + max(o - 1, 0)
        total += positions * linear + attn_per_key * positions * (positions + 1) / 2
        total += o * 2 * hidden * vocab
    return total


def weight_bytes_per_token(hf_config, dtype: str | torch.dtype) -> int:
    """Bytes of weights one decode step reads: every linear layer plus the lm_head (the
    single embedding row is negligible)."""
    hidden, _, layers, _, _, _, vocab = _shape(hf_config)
    elem = torch.tensor([], dtype=_as_dtype(dtype)).element_size()
    return (layers * linear_params_per_layer(hf_config) + hidden * vocab) * elem


def decode_bandwidth_bound(hf_config, dtype: str | torch.dtype, bandwidth: float,
                           context_len: int = 0) -> float:
    """The least seconds one decode step at batch 1 can take when reading memory at
    ``bandwidth`` bytes/s: weight bytes plus the K and V of ``context_len`` tokens."""
    _, _, layers, _, kv_heads, head_dim, _ = _shape(hf_config)
    elem = torch.tensor([], dtype=_as_dtype(dtype)).element_size()
    kv = 2 * layers * kv_heads * head_dim * context_len * elem
    return (weight_bytes_per_token(hf_config, dtype) + kv) / bandwidth


def calibration_device(platform_name: str | None) -> str:
    """The torch device whose ceilings bound a platform: its GPU on cuda, else the host
    CPU (also for TPU, whose JAX runtime torch cannot measure)."""
    return "cuda" if platform_name == "cuda" else "cpu"


def measure_ceilings(dtype: str | torch.dtype, seconds: float = 2.0,
                     device: str = "cpu") -> dict[str, float]:
    """Both ceilings, measured now: ``peak_flops_per_s`` (matmul in ``dtype``) and
    ``bandwidth_bytes_per_s``, spending about ``seconds`` in all."""
    t0 = time.perf_counter()
    peak = calibrate_matmul_peak(dtype, seconds * 0.6, device=device)
    bandwidth = calibrate_bandwidth(seconds=seconds * 0.4, device=device)
    return {"peak_flops_per_s": peak, "bandwidth_bytes_per_s": bandwidth,
            "calibration_s": time.perf_counter() - t0}


def ceilings_after_shutdown(llm, dtype: str, seconds: float) -> tuple[Any, dict[str, float]]:
    """Shut ``llm``'s engine down, then measure the machine's ceilings.

    Measured once the engine is gone, nothing competes for the cores and the large
    calibration buffers stay out of the peak-memory figures. Returns (the engine's
    config, the ceilings).
    """
    llm.llm_engine.shutdown()
    config = llm.llm_engine.config
    return config, measure_ceilings(dtype, seconds, calibration_device(config.platform))

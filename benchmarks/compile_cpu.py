"""Eager vs piecewise-compiled (Inductor, no capture) model steps on the CPU.

    python benchmarks/compile_cpu.py [--model PATH] [--rounds 7] [--threads N] [--output-json PATH]

Loads the model (default: SmolLM2-135M-Instruct, float32), allocates a paged KV cache
and times one forward pass through the CPU paged attention for decode batches of 1, 8
and 32 sequences (each with a 256-token context) and a 128-token prefill. Eager and
compiled calls alternate in every round, so load from other processes hits both alike;
the figure is the median over rounds of each round's mean. A ratio < 1 means compiled
is faster. The compile cache lives in a fresh temporary folder unless --cache-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from piston.attention.forward_context import ForwardContext, set_forward_context
from piston.attention.layer import attention_layers
from piston.attention.metadata import CommonAttentionMetadata
from piston.compilation.compiled_model import compile_model
from piston.model_resolver import default_model_path
from piston.models.loader import load_model
from piston.step.config import CompilationConfig, EngineConfig, ModelConfig

BLOCK_SIZE = 16
CONTEXT = 256


def _metadata(query_lens: list[int], seq_lens: list[int]) -> CommonAttentionMetadata:
    """Sequence i owns its own run of blocks; its queries are its last query_lens[i] tokens."""
    blocks_per_seq = -(-max(seq_lens) // BLOCK_SIZE)
    qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(query_lens)
    lens = np.array(seq_lens, dtype=np.int32)
    table = np.arange(len(seq_lens) * blocks_per_seq, dtype=np.int32).reshape(len(seq_lens), blocks_per_seq)
    slots = np.concatenate([table[i, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                            for i, (q, s) in enumerate(zip(query_lens, seq_lens))
                            for p in [np.arange(s - q, s)]]).astype(np.int64)
    return CommonAttentionMetadata(
        num_reqs=len(query_lens), num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc_np=qsl, seq_lens_np=lens,
        query_start_loc=torch.from_numpy(qsl), seq_lens=torch.from_numpy(lens),
        block_table=torch.from_numpy(table), slot_mapping=torch.from_numpy(slots), block_size=BLOCK_SIZE)


def main() -> None:
    from piston_cpu.attention import CpuAttention

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls per mode per round")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = args.model or str(default_model_path())
    mc = ModelConfig(model=path, path=path, dtype=args.dtype)
    model = load_model(mc)
    layers = attention_layers(model)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="piston-compile-bench-")
    config = EngineConfig(mc, compilation_config=CompilationConfig(mode="piecewise", cache_dir=cache_dir))
    start = time.perf_counter()
    compiled = compile_model(model, config, torch.device("cpu"), layers)
    compile_s = time.perf_counter() - start

    hf = mc.hf_config
    impl = CpuAttention()
    kv_heads = hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    scenarios = {f"decode x{b} (ctx {CONTEXT})": ([1] * b, [CONTEXT] * b) for b in (1, 8, 32)}
    scenarios["prefill 128"] = ([128], [128])
    num_blocks = 32 * (CONTEXT // BLOCK_SIZE)
    shape = impl.kv_cache_shape(num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    kv_caches = [torch.zeros(shape, dtype=getattr(torch, args.dtype)) for _ in range(hf.num_hidden_layers)]
    gen = torch.Generator().manual_seed(0)

    results = []
    print(f"threads={torch.get_num_threads()} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
          f"compile={compile_s:.1f}s pieces={compiled.num_pieces}")
    for name, (query_lens, seq_lens) in scenarios.items():
        common = _metadata(query_lens, seq_lens)
        ctx = ForwardContext(impl.build_metadata(common), kv_caches, impl, layers)
        n = common.num_actual_tokens
        ids = torch.randint(0, hf.vocab_size, (n,), generator=gen)
        positions = torch.from_numpy(np.concatenate([np.arange(s - q, s) for q, s in zip(query_lens, seq_lens)]))
        runners = {"eager": model, "compiled": compiled}
        per_round: dict[str, list[float]] = {k: [] for k in runners}
        with torch.inference_mode(), set_forward_context(ctx):
            logits_eager = model.compute_logits(model(ids, positions))
            logits_compiled = model.compute_logits(compiled(ids, positions))
            max_diff = (logits_eager - logits_compiled).abs().max().item()
            if not torch.equal(logits_eager.argmax(-1), logits_compiled.argmax(-1)):
                raise AssertionError(f"{name}: compiled and eager greedy tokens differ (max logit diff {max_diff})")
            for fn in runners.values():  # warm-up
                for _ in range(2):
                    fn(ids, positions)
            for r in range(args.rounds):
                order = list(runners) if r % 2 == 0 else list(reversed(runners))
                for key in order:
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        runners[key](ids, positions)
                    per_round[key].append((time.perf_counter() - t0) / args.calls * 1e3)
        eager_ms = statistics.median(per_round["eager"])
        compiled_ms = statistics.median(per_round["compiled"])
        ratios = [c / e for c, e in zip(per_round["compiled"], per_round["eager"])]
        results.append(dict(scenario=name, eager_ms=round(eager_ms, 2), compiled_ms=round(compiled_ms, 2),
                            ratio_median=round(statistics.median(ratios), 3),
                            ratio_min=round(min(ratios), 3), ratio_max=round(max(ratios), 3), max_logit_diff=max_diff))
        print(f"{name:24s} eager {eager_ms:8.2f} ms  compiled {compiled_ms:8.2f} ms  "
              f"compiled/eager {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}..{max(ratios):.3f}) "
              f"max logit diff {max_diff:.1e}")
    report = dict(model=path, dtype=args.dtype, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                  load_average_end=os.getloadavg()[0], compile_seconds=round(compile_s, 1),
                  rounds=args.rounds, calls=args.calls, results=results,
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

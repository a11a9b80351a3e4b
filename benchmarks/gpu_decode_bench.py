"""Decode step time on a Llama-3-8B-shaped random-weight model: CUDA graphs vs --enforce-eager.

    python benchmarks/gpu_decode_bench.py [--model FOLDER] [--shape llama3-8b|tiny] [--platform cuda]
                                  [--batch-sizes 1,8,64,256] [--steps 32] [--output-json PATH]

Each mode runs in a child process with its own engine: "graphs" (compilation mode
piecewise: the model is split at attention, compiled, and the pieces replayed as CUDA
graphs) and "eager" (--enforce-eager). For each batch size B the child generates from B
prompts of 16 random tokens twice, once 1 token and once 1 + steps tokens (ignore_eos,
prefix caching off, the whole prefill in one step), so

    decode step time = (t(1 + steps) - t(1)) / steps

is one engine step of B decoding sequences, scheduling and sampling included. Prints
"RESULT <name> <value>" lines (ms), the speedup of graphs over eager per batch size, and at
batch 1 the ratio of the step time to the weight-bandwidth limit (weight bytes /
--hbm-tbps, 3.35 TB/s on an H100 SXM). Without --model a folder with config.json and a
word-level tokenizer over the whole vocabulary is written to a temporary folder
(load_format=dummy: random weights, nothing downloaded). --shape tiny smoke-tests the
script on any platform.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPT_LEN = 16
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128256, max_position_embeddings=8192),
}


def write_model(folder: str, shape: str) -> None:
    """config.json (Llama 3 settings) and a tokenizer whose ids decode to "<tN>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=False,
                  bos_token_id=128000, eos_token_id=128001, **SHAPES[shape])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    vocab = {f"<t{i}>": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>", bos_token="<t128000>",
                            eos_token="<t128001>").save_pretrained(folder)


def weight_bytes(folder: str, dtype_bytes: int = 2) -> int:
    """Bytes of the model's weights, from its config.json (Llama layout, untied lm_head)."""
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    lm_head = 0 if c.get("tie_word_embeddings") else vocab * h
    return (vocab * h + layers * per_layer + h + lm_head) * dtype_bytes


def run_child(args: argparse.Namespace) -> None:
    """One engine in one mode; prints a DECODE_JSON line with ms per step by batch size."""
    import random

    from piston import LLM, SamplingParams

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    mode = args.child
    kwargs = dict(load_format="dummy", dtype=args.dtype, platform=args.platform, max_model_len=512,
                  max_num_seqs=max(batch_sizes), max_num_batched_tokens=max(2048, max(batch_sizes) * PROMPT_LEN),
                  enable_prefix_caching=False, seed=0)
    if args.kv_cache_memory:
        kwargs["kv_cache_memory"] = args.kv_cache_memory
    if mode == "eager":
        kwargs["enforce_eager"] = True
    else:
        kwargs["compilation_mode"] = "piecewise"
    start = time.perf_counter()
    llm = LLM(model=args.model, **kwargs)
    startup = time.perf_counter() - start
    rng = random.Random(0)

    def generate(batch: int, tokens: int) -> float:
        # Ids below 30000 exist in every vocabulary this is run with (and decode to text).
        prompts = [[rng.randrange(1000, 30000) for _ in range(PROMPT_LEN)] for _ in range(batch)]
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    step_ms = {}
    for batch in batch_sizes:
        generate(batch, 4)  # warm-up: allocator, kernels, this batch's graphs
        best = None
        for _ in range(args.repeats):
            one = generate(batch, 1)
            many = generate(batch, 1 + args.steps)
            ms = max(many - one, 0.0) / args.steps * 1e3
            best = ms if best is None else min(best, ms)
        step_ms[batch] = best
    shutdown = getattr(llm.llm_engine, "shutdown", None)
    if callable(shutdown):
        shutdown()
    print("DECODE_JSON " + json.dumps(dict(mode=mode, startup_s=startup, step_ms=step_ms)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: write one for --shape)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--platform", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,8,64,256")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (the fastest counts)")
    parser.add_argument("--modes", default="graphs,eager")
    parser.add_argument("--kv-cache-memory", default=None, help="e.g. 8GiB (default: the platform's)")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth for the batch-1 limit")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per mode")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="piston-decode-bench-")
        args.model = os.path.join(tmp.name, args.shape)
        write_model(args.model, args.shape)
    results: dict[str, dict] = {}
    failed = False
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode] + [
            a for a in sys.argv[1:] if a != "--model" and a != args.model] + ["--model", args.model]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"RESULT decode_{mode} failed (timeout {args.timeout} s)")
            failed = True
            continue
        for line in proc.stderr.splitlines():  # the engine's start-up figures
            if "Compiled the model" in line or "Captured" in line or "EngineCore ready" in line:
                print(f"[{mode}] {line.strip()}")
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("DECODE_JSON ")]
        if proc.returncode != 0 or not found:
            print(f"RESULT decode_{mode} failed (exit {proc.returncode})")
            print("\n".join(proc.stderr.splitlines()[-30:]), file=sys.stderr)
            failed = True
            continue
        results[mode] = json.loads(found[-1][len("DECODE_JSON "):])
        print(f"RESULT decode_{mode}_startup_s {results[mode]['startup_s']:.1f}")
    for b in args.batch_sizes.split(","):
        row = {m: r["step_ms"].get(b) for m, r in results.items()}
        for m, ms in row.items():
            print(f"RESULT decode_step_ms_b{b}_{m} {ms:.2f}")
        if row.get("graphs") and row.get("eager"):
            print(f"RESULT decode_speedup_b{b} {row['eager'] / row['graphs']:.2f}")
    limit_ms = weight_bytes(args.model) / (args.hbm_tbps * 1e12) * 1e3
    print(f"RESULT decode_b1_weight_limit_ms {limit_ms:.2f}")
    for m, r in results.items():
        if "1" in r["step_ms"]:
            print(f"RESULT decode_b1_{m}_vs_weight_limit {r['step_ms']['1'] / limit_ms:.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(results=results, weight_limit_ms_b1=limit_ms, hbm_tbps=args.hbm_tbps,
                           shape=args.shape, steps=args.steps), f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Decode step time on a Llama-3-8B-shaped random-weight model: CUDA graphs vs --enforce-eager,
against the batch-1 weight-bandwidth bound; and cascade attention on vs off.

    python benchmarks/gpu_decode_bench.py [--model FOLDER] [--shape llama3-8b|tiny] [--platform cuda]
                                  [--batch-sizes 1,8,64,256] [--steps 32] [--prefix-len 2048]
                                  [--output-json PATH]

Each mode runs in a child process with its own engine: "graphs" (compilation mode
piecewise: the model is split at attention, compiled, and the pieces replayed as CUDA
graphs), "eager" (--enforce-eager) and "nocascade" (graphs, --disable-cascade-attn). For
each batch size B the graphs and eager children generate from B prompts of 16 random
tokens twice, once 1 token and once 1 + steps tokens (ignore_eos, the whole prefill in
one step), so

    decode step time = (t(1 + steps) - t(1)) / steps

is one engine step of B decoding sequences, scheduling and sampling included. The batch-1
step is set against the weight-bandwidth bound: weight bytes over the device's copy
bandwidth (bytes read plus written by a large device-to-device copy, measured here before
the engines start; --hbm-tbps overrides it).

With --prefix-len N the graphs and nocascade children also time the cascade workload:
--prefix-prompts requests of one shared N-token system prompt plus 32 tokens of their own,
--prefix-output-len tokens each, the prefix already in the prefix cache; cascade attention
reads the shared blocks once per step instead of once per request.

Prints "RESULT <name> <value>" lines. Without --model a folder with config.json and a
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
PREFIX_SUFFIX_LEN = 32  # each cascade-workload request's own tokens after the shared prefix
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


def measure_copy_tbps(nbytes: int = 4 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in TB/s, counting the bytes read and the bytes
    written (the best of ``repeats`` copies of ``nbytes``)."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best / 1e12


def run_child(args: argparse.Namespace) -> None:
    """One engine in one mode; prints a DECODE_JSON line with ms per step by batch size and
    the cascade workload's figures."""
    import random

    from piston import LLM, SamplingParams

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    mode = args.child
    prefix_tokens = args.prefix_len + PREFIX_SUFFIX_LEN + args.prefix_output_len if args.prefix_len else 0
    kwargs = dict(load_format="dummy", dtype=args.dtype, platform=args.platform,
                  max_model_len=max(512, -(-prefix_tokens // 256) * 256),
                  max_num_seqs=max(batch_sizes + [args.prefix_prompts if args.prefix_len else 1]),
                  max_num_batched_tokens=max(2048, max(batch_sizes) * PROMPT_LEN), seed=0)
    if args.kv_cache_memory:
        kwargs["kv_cache_memory"] = args.kv_cache_memory
    if mode == "eager":
        kwargs["enforce_eager"] = True
    else:
        kwargs["compilation_mode"] = "piecewise"
    if mode == "nocascade":
        kwargs["disable_cascade_attn"] = True
    start = time.perf_counter()
    llm = LLM(model=args.model, **kwargs)
    startup = time.perf_counter() - start
    rng = random.Random(0)

    def generate(prompts: list[list[int]], tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    def random_prompts(batch: int, length: int) -> list[list[int]]:
        # Ids below 30000 exist in every vocabulary this is run with (and decode to text).
        return [[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(batch)]

    step_ms = {}
    for batch in (batch_sizes if mode != "nocascade" else []):
        generate(random_prompts(batch, PROMPT_LEN), 4)  # warm-up: allocator, kernels, this batch's graphs
        best = None
        for _ in range(args.repeats):
            one = generate(random_prompts(batch, PROMPT_LEN), 1)
            many = generate(random_prompts(batch, PROMPT_LEN), 1 + args.steps)
            ms = max(many - one, 0.0) / args.steps * 1e3
            best = ms if best is None else min(best, ms)
        step_ms[batch] = best
    prefix = {}
    if args.prefix_len and mode != "eager":
        shared = random_prompts(1, args.prefix_len)[0]
        prompts = [shared + p for p in random_prompts(args.prefix_prompts, PREFIX_SUFFIX_LEN)]
        generate(prompts[:1], 1)  # the shared prefix into the prefix cache
        generate(random_prompts(1, PROMPT_LEN), 4)
        best = None
        for _ in range(args.repeats):
            best = min(best or float("inf"), generate(prompts, args.prefix_output_len))
        prefix = dict(seconds=best, output_tokens_per_s=len(prompts) * args.prefix_output_len / best)
    shutdown = getattr(llm.llm_engine, "shutdown", None)
    if callable(shutdown):
        shutdown()
    print("DECODE_JSON " + json.dumps(dict(mode=mode, startup_s=startup, step_ms=step_ms, prefix=prefix)),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: write one for --shape)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--platform", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,8,64,256")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (the fastest counts)")
    parser.add_argument("--modes", default="graphs,eager,nocascade")
    parser.add_argument("--prefix-len", type=int, default=0,
                        help="shared system-prompt tokens of the cascade workload (0: no cascade workload)")
    parser.add_argument("--prefix-prompts", type=int, default=64)
    parser.add_argument("--prefix-output-len", type=int, default=128)
    parser.add_argument("--kv-cache-memory", default=None, help="e.g. 8GiB (default: the platform's)")
    parser.add_argument("--hbm-tbps", type=float, default=None,
                        help="memory bandwidth for the batch-1 bound (default: measured, on cuda)")
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
    if args.hbm_tbps is None:
        if args.platform != "cuda":
            parser.error("--hbm-tbps is needed off cuda (the bandwidth is measured on the GPU)")
        args.hbm_tbps = measure_copy_tbps()
        print(f"RESULT copy_bandwidth_tbps {args.hbm_tbps:.2f}")
    modes = [m for m in args.modes.split(",") if m != "nocascade" or args.prefix_len]
    results: dict[str, dict] = {}
    failed = False
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--hbm-tbps", str(args.hbm_tbps)] + [
            a for a in sys.argv[1:] if a != "--model" and a != args.model] + ["--model", args.model]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            print(f"RESULT decode_{mode} failed (timeout {args.timeout} s)")
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            print("\n".join(tail.splitlines()[-30:]), file=sys.stderr)
            failed = True
            continue
        for line in proc.stderr.splitlines():  # the engine's start-up figures
            if any(k in line for k in ("Compiled", "Captured", "CUDA graphs hold", "Memory profile", "ready")):
                print(f"[{mode}] {line.strip()}")
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("DECODE_JSON ")]
        if proc.returncode != 0 or not found:
            print(f"RESULT decode_{mode} failed (exit {proc.returncode})")
            print("\n".join(proc.stderr.splitlines()[-40:]), file=sys.stderr)
            failed = True
            continue
        results[mode] = json.loads(found[-1][len("DECODE_JSON "):])
        print(f"RESULT decode_{mode}_startup_s {results[mode]['startup_s']:.1f}")
    for b in args.batch_sizes.split(","):
        row = {m: r["step_ms"][b] for m, r in results.items() if b in r["step_ms"]}
        for m, ms in row.items():
            print(f"RESULT decode_step_ms_b{b}_{m} {ms:.2f}")
        if row.get("graphs") and row.get("eager"):
            print(f"RESULT decode_speedup_b{b} {row['eager'] / row['graphs']:.2f}")
    limit_ms = weight_bytes(args.model) / (args.hbm_tbps * 1e12) * 1e3
    print(f"RESULT decode_b1_weight_bound_ms {limit_ms:.2f}")
    for m, r in results.items():
        if "1" in r["step_ms"]:
            print(f"RESULT decode_b1_{m}_vs_bound {r['step_ms']['1'] / limit_ms:.2f}")
    for m, r in results.items():
        if r.get("prefix"):
            print(f"RESULT prefix{args.prefix_len}_{m}_output_tokens_per_s {r['prefix']['output_tokens_per_s']:.1f}")
    on, off = (results.get(m, {}).get("prefix") for m in ("graphs", "nocascade"))
    if on and off:
        ratio = on["output_tokens_per_s"] / off["output_tokens_per_s"]
        print(f"RESULT prefix{args.prefix_len}_cascade_speedup {ratio:.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(results=results, weight_bound_ms_b1=limit_ms, hbm_tbps=args.hbm_tbps,
                           shape=args.shape, steps=args.steps, prefix_len=args.prefix_len), f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

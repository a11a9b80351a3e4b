"""KV-cache memory of one long request with a sliding window, against keeping every block.

    python benchmarks/sliding_window_kv.py [--prompt-len 8000] [--output-len 192] [--windows none,4096,1024]
        [--layers 4] [--hidden 256] [--block-size 16] [--max-num-batched-tokens 2048]
    python benchmarks/sliding_window_kv.py --model gemma3 [--layers 6] [--windows 4096,1024,512]

For each window (``none``: full attention, every block kept), a random Mistral-like model of
that ``sliding_window`` on every layer (float32, SmolLM2's tokenizer, dummy weights; the
figure does not depend on the weights) runs one request of ``--prompt-len`` random prompt
tokens and ``--output-len`` greedy output tokens (``ignore_eos``), engine in process. After
every step the blocks in use are read from the KV cache manager; reported: the most held at
once (during the chunked prefill: the window plus a chunk), the blocks held at the last
decode step, both in MiB (the model's bytes per block), and their ratio to keeping every
block (the ``none`` run).

``--model gemma3``: a Gemma 3-like model instead, every sixth layer global and the others
sliding over the window (``--layers 6``: five local, one global, as Gemma 3). Each window runs
twice: with the hybrid KV cache (a block table per group of layers: the sliding groups free
their blocks behind the window, the global group keeps all) and with one block table for every
layer (``disable_hybrid_kv_cache_manager``: every block kept). Blocks differ in size between
the two (a hybrid block is one group's layers), so the ratio is of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ["PISTON_ENGINE_IN_PROCESS"] = "1"  # the scheduler is this process's, so its blocks can be read

import numpy as np  # noqa: E402

from piston import LLM, SamplingParams  # noqa: E402


def write_model(folder: str, args, window: int | None) -> str:
    from piston.model_resolver import default_model_path
    from piston.tokenizer import load_tokenizer

    heads = args.hidden // 64
    if args.model == "gemma3":
        config = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=49152,
                      hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
                      max_position_embeddings=args.prompt_len + args.output_len + 64, rms_norm_eps=1e-6,
                      sliding_window=window, query_pre_attn_scalar=64, bos_token_id=1, eos_token_id=2,
                      layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                   for i in range(args.layers)],
                      tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", dtype="float32")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        load_tokenizer(default_model_path()).save_pretrained(folder)
        return folder
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=49152,
                  hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
                  max_position_embeddings=args.prompt_len + args.output_len + 64, rms_norm_eps=1e-5,
                  rope_theta=1e6, tie_word_embeddings=True, sliding_window=window, bos_token_id=1,
                  eos_token_id=2, hidden_act="silu", dtype="float32")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    load_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


def run(args, window: int | None, hybrid: bool = True) -> dict:
    folder = write_model(os.path.join(tempfile.gettempdir(), f"piston-window-bench-{args.model}-{window}"), args,
                         window)
    max_len = args.prompt_len + args.output_len
    llm = LLM(folder, load_format="dummy", dtype="float32", kv_cache_memory=args.kv_cache_memory, seed=0,
              max_model_len=max_len, block_size=args.block_size,
              max_num_batched_tokens=args.max_num_batched_tokens, disable_hybrid_kv_cache_manager=not hybrid)
    core = llm.llm_engine.engine_core.engine_core
    scheduler, kv = core.scheduler, core.scheduler.kv_cache_manager
    bytes_per_block = core.kv_cache_memory / kv.num_blocks
    held: list[int] = []
    schedule = scheduler.schedule

    def schedule_and_count():
        out = schedule()
        held.append(kv.num_blocks - kv.block_pool.get_num_free_blocks())
        return out

    scheduler.schedule = schedule_and_count
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 49000, args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    [out] = llm.generate([prompt], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert len(out.outputs[0].token_ids) == args.output_len
    llm.llm_engine.shutdown()
    groups = getattr(kv, "num_groups", 1)
    return dict(window=window, peak=max(held), last=held[-1], steps=len(held), seconds=elapsed,
                mib=bytes_per_block / 2**20, released=kv.sliding_window is not None or groups > 1, groups=groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-len", type=int, default=8000)
    parser.add_argument("--output-len", type=int, default=192)
    parser.add_argument("--model", choices=["mistral", "gemma3"], default="mistral")
    parser.add_argument("--windows", default=None, help="default: none,4096,1024 (gemma3: 4096,1024,512)")
    parser.add_argument("--layers", type=int, default=None, help="default 4 (gemma3: 6)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory", default="1GiB")
    args = parser.parse_args()
    gemma3 = args.model == "gemma3"
    args.windows = args.windows or ("4096,1024,512" if gemma3 else "none,4096,1024")
    args.layers = args.layers or (6 if gemma3 else 4)
    if gemma3:
        return compare_hybrid(args)

    results = [run(args, None if w == "none" else int(w)) for w in args.windows.split(",")]
    full = next((r for r in results if r["window"] is None), None)
    total = args.prompt_len + args.output_len
    print(f"One request of {args.prompt_len} prompt + {args.output_len} output tokens ({total} in all), "
          f"blocks of {args.block_size} tokens ({results[0]['mib']:.3f} MiB each: {args.layers} layers), "
          f"chunks of {args.max_num_batched_tokens} tokens")
    print("| sliding_window | blocks freed | most blocks held (MiB) | held at the end (MiB) | end / every block | "
          "steps | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['last'] / full['last']:.3f}" if full else "-"
        print(f"| {r['window'] or 'none (full)'} | {'yes' if r['released'] else 'no'} | {r['peak']} "
              f"({r['peak'] * r['mib']:.1f}) | {r['last']} ({r['last'] * r['mib']:.1f}) | {ratio} | {r['steps']} | "
              f"{r['seconds']:.1f} |")


def compare_hybrid(args) -> None:
    """Each window with the hybrid KV cache and with one block table for all layers."""
    total = args.prompt_len + args.output_len
    print(f"Gemma 3-like model, {args.layers} layers (every sixth global), one request of {args.prompt_len} prompt "
          f"+ {args.output_len} output tokens ({total} in all), blocks of {args.block_size} tokens, chunks of "
          f"{args.max_num_batched_tokens} tokens")
    print("| sliding_window | KV cache | block tables | MiB per block | most held, MiB | held at the end, MiB | "
          "end / one table | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for w in args.windows.split(","):
        single, hybrid = run(args, int(w), hybrid=False), run(args, int(w), hybrid=True)
        for name, r in (("one table, every block", single), ("hybrid", hybrid)):
            ratio = r["last"] * r["mib"] / (single["last"] * single["mib"])
            print(f"| {w} | {name} | {r['groups']} | {r['mib']:.4f} | {r['peak'] * r['mib']:.1f} | "
                  f"{r['last'] * r['mib']:.1f} | {ratio:.3f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()

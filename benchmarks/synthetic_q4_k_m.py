"""Memory of packed weights: a synthetic Llama-7B-shaped Q4_K_M GGUF, loaded and decoded.

Writes (once) a GGUF with Llama 2 7B's shapes (hidden 4096, 32 layers, 32 heads, MLP 11008,
vocabulary 32000) and llama.cpp's Q4_K_M mix of types: Q4_K everywhere, Q6_K for the output
matrix and for attn_v and ffn_down in llama.cpp's "more bits" layers (the first and last
eighth, and every third in between). The blocks are random bytes with small float16
scales, written with the ``gguf`` package. In float32 this model needs about 27 GB; packed
it is the file's size.

Then Piston serves it (the tokenizer is SmolLM2's; prompts are token ids below 32000),
decodes a few tokens, and reports the engine's resident memory against the file size:

    weights resident = engine RssAnon - the engine's own anonymous memory

where the engine's own (torch, the runner, the touched KV cache) is measured by serving
SmolLM2's Q4_1 file the same way: its RssAnon minus its packed weights. Also reported: the
engine's VmRSS and peak (VmHWM), and the decode time per token.

    python benchmarks/synthetic_q4_k_m.py [--path /tmp/piston-synthetic-7b-Q4_K_M.gguf]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

HIDDEN, LAYERS, HEADS, INTER, VOCAB, CONTEXT = 4096, 32, 32, 11008, 32000, 4096


def _more_bits(i: int, n: int) -> bool:  # llama.cpp's use_more_bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _blocks(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    from piston.checkpoint.packed import FORMATS

    spec = FORMATS[fmt]
    data = rng.integers(0, 256, (rows, cols // 256, spec.block_bytes), dtype=np.uint8)
    if fmt == "Q4_K":  # values d*sc*q - dmin*m with q < 16, sc, m < 64: |w| < 0.06
        data[..., 0:2] = np.array([6e-5], np.float16).view(np.uint8)
        data[..., 2:4] = np.array([4.5e-4], np.float16).view(np.uint8)
    else:  # Q6_K: d * scale * (q - 32) with int8 scales: |w| < 0.13
        data[..., 208:210] = np.array([3e-5], np.float16).view(np.uint8)
    return data.reshape(rows, -1)


def write_synthetic(path: str, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama", use_temp_file=True)
    writer.add_name("synthetic-llama-7b-Q4_K_M")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)

    def add(name: str, fmt: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, _blocks(fmt, rows, cols, rng), raw_dtype=gguf.GGMLQuantizationType[fmt])

    add("token_embd.weight", "Q4_K", VOCAB, HIDDEN)
    for i in range(LAYERS):
        more = _more_bits(i, LAYERS)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for part in ("attn_q", "attn_k", "attn_output"):
            add(f"blk.{i}.{part}.weight", "Q4_K", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_v.weight", "Q6_K" if more else "Q4_K", HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", "Q4_K", INTER, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", "Q4_K", INTER, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", "Q6_K" if more else "Q4_K", HIDDEN, INTER)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    add("output.weight", "Q6_K", VOCAB, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _packed_bytes(path: str) -> int:
    from piston.checkpoint.gguf_tensors import _stays_packed
    from piston.step.gguf_metadata import open_gguf

    return sum(int(t.n_bytes) for t in open_gguf(path).tensors if _stays_packed(t))


def _serve(path: str, tokenizer: str, kv: str, prompt_len: int, new_tokens: int) -> dict:
    from piston import LLM, SamplingParams
    from piston.step.config import parse_size

    llm = LLM(model=path, tokenizer=tokenizer, max_model_len=prompt_len + new_tokens + 16, kv_cache_memory=kv,
              quantization="gguf", dtype="float32")
    try:
        pid = llm.llm_engine.engine_core.engine_pid
        loaded = _status(pid)
        prompt = [int(t) for t in np.random.default_rng(1).integers(100, 30000, prompt_len)]
        out = llm.generate([prompt], SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0),
                           use_tqdm=False)[0]
        m = out.metrics
        return {"after_load": loaded, "after_decode": _status(pid), "kv_cache_bytes": parse_size(kv),
                "ms_per_token": (m["finished_time"] - m["first_token_time"]) / (new_tokens - 1) * 1e3,
                "ttft_s": m["first_token_time"] - m["arrival_time"], "tokens": list(out.outputs[0].token_ids)}
    finally:
        llm.llm_engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="/tmp/piston-synthetic-7b-Q4_K_M.gguf")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    from piston.model_resolver import default_model_path

    if not os.path.isfile(args.path):
        start = time.perf_counter()
        write_synthetic(args.path + ".tmp")
        os.rename(args.path + ".tmp", args.path)
        print(f"wrote {args.path} in {time.perf_counter() - start:.0f} s")
        gc.collect()
    smollm2 = str(default_model_path())
    file_bytes = os.path.getsize(args.path)
    base = _serve(smollm2, smollm2, args.kv_cache_memory, args.prompt_len, 4)
    own = base["after_decode"]["RssAnon"] - _packed_bytes(smollm2)
    big = _serve(args.path, smollm2, args.kv_cache_memory, args.prompt_len, args.new_tokens)
    weights = big["after_decode"]["RssAnon"] - own
    gib = 2**30
    print(f"file {file_bytes / gib:.2f} GiB; engine VmRSS {big['after_decode']['VmRSS'] / gib:.2f} GiB, "
          f"peak (VmHWM) {big['after_decode']['VmHWM'] / gib:.2f} GiB, RssAnon "
          f"{big['after_decode']['RssAnon'] / gib:.2f} GiB (the engine's own, from SmolLM2: {own / gib:.2f} GiB; "
          f"KV cache {big['kv_cache_bytes'] / gib:.2f} GiB allocated)")
    print(f"weights resident {weights / gib:.2f} GiB = {weights / file_bytes:.3f}x the file; "
          f"decode {big['ms_per_token']:.0f} ms/token, first token after {big['ttft_s']:.1f} s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"file_bytes": file_bytes, "smollm2": base, "synthetic": big, "engine_own_bytes": own,
                       "weights_resident_bytes": weights, "ratio": weights / file_bytes}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

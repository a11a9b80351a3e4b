"""Multi-LoRA throughput: requests spread over several adapters against the base model alone,
in one run.

    python benchmarks/lora.py [--model MODEL] [--quantization auto] [--num-requests 64]
        [--num-adapters 8] [--rank 16] [--input-len 128] [--output-len 128] [--rounds 2]

Writes ``--num-adapters`` random PEFT adapters of rank ``--rank`` on all seven projections
(q/k/v/o, gate/up/down; the layout ``PeftModel.save_pretrained`` writes) into a temporary
folder, then times the same batch of ``--num-requests`` prompts (random token ids,
``--input-len`` each, ``--output-len`` output tokens, ``ignore_eos``: every run does the
same work) in three ways, the engines alternating round by round:

- ``base``: an engine without LoRA;
- ``lora-off``: an engine with ``enable_lora`` (``max_loras`` = the adapter count), every
  request on the base model (what LoRA support costs requests that use no adapter);
- ``lora``: the same engine, request i on adapter i % num_adapters, so every step mixes
  all the adapters.

Reported per round: wall time, output tokens/s and the ratio to ``base`` of the same round;
then the median of the rounds. The target of issue 20: ``lora`` at most 25% slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from piston import LLM, LoRARequest, SamplingParams
from piston.step.lora_adapter import LORA_MODULES, LoRAModelDims, module_name


def write_adapter(folder: str, dims: LoRAModelDims, rank: int, seed: int) -> None:
    """A random PEFT LoRA adapter: A as PEFT initialises it (Kaiming-uniform), B small and
    nonzero (a trained adapter's B is no longer zero)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(dims.num_layers):
        for module in LORA_MODULES:
            in_f, out_f = dims.features[module]
            prefix = f"base_model.model.{module_name(layer, module)}"
            bound = 1.0 / np.sqrt(in_f)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (rank, in_f)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0.0, 0.02, (out_f, rank)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_MODULES),
                   "bias": "none", "use_rslora": False}, f)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, loras) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the built-in default model (SmolLM2-135M Q4_1)")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-memory", default="1GiB")
    args = parser.parse_args()

    common = dict(model=args.model, quantization=args.quantization, kv_cache_memory=args.kv_cache_memory,
                  max_num_seqs=max(args.num_requests, 1), seed=0)
    base = LLM(**common)
    lora = LLM(**common, enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
    dims = LoRAModelDims.from_hf_config(base.llm_engine.config.model_config.hf_config)
    vocab = base.llm_engine.config.model_config.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for i in range(args.num_adapters):
            folder = os.path.join(tmp, f"adapter{i}")
            write_adapter(folder, dims, args.rank, seed=i)
            adapters.append(LoRARequest(f"adapter{i}", i + 1, folder))
        per_request = [adapters[i % len(adapters)] for i in range(args.num_requests)]
        for a in adapters:
            lora.add_lora(a)
        ways = {"base": (base, None), "lora-off": (lora, None), "lora": (lora, per_request)}
        # Warm-up (the CPU kernels, the adapters' first slot writes), not timed.
        warm = [list(map(int, rng.integers(100, vocab - 100, 16))) for _ in range(len(adapters))]
        for llm, loras in ways.values():
            llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False,
                         lora_request=adapters if loras is not None else None)
        ratios: dict[str, list[float]] = {name: [] for name in ways}
        print(f"{args.num_requests} requests, {args.input_len} prompt + {args.output_len} output tokens each; "
              f"{args.num_adapters} adapters of rank {args.rank} on q/k/v/o and gate/up/down")
        for r in range(args.rounds):
            prompts = [list(map(int, rng.integers(100, vocab - 100, args.input_len)))
                       for _ in range(args.num_requests)]
            tok_s = {}
            for name, (llm, loras) in ways.items():
                elapsed, tokens = run(llm, prompts, params, loras)
                tok_s[name] = tokens / elapsed
                print(f"round {r + 1} {name:>8}: {elapsed:6.2f} s, {tok_s[name]:7.1f} output tokens/s")
            for name in ways:
                ratios[name].append(tok_s[name] / tok_s["base"])
            print(f"round {r + 1} ratio to base: " + ", ".join(f"{n} {ratios[n][-1]:.3f}" for n in ways))
        print("median ratio to base (output tokens/s): "
              + ", ".join(f"{n} {statistics.median(v):.3f}" for n, v in ratios.items()))
        print(f"lora slowdown: {100 * (1 / statistics.median(ratios['lora']) - 1):.1f}% (target: <= 25%)")


if __name__ == "__main__":
    main()

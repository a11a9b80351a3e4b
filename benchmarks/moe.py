"""Mixture-of-experts throughput: Piston's fused MoE layer against the naive formulations,
in one process.

    python benchmarks/moe.py [--layers 4] [--hidden 1024] [--experts 8] [--inter 1408] [--top-k 2]
        [--forward-tokens 16,512] [--num-requests 16] [--input-len 64] [--output-len 32] [--rounds 3]

A tiny-but-wide random Mixtral (float32, SmolLM2's tokenizer and 49k vocabulary, tied
embeddings; a config written to a temporary folder, loaded with dummy weights that are then
replaced by random ones of unit-scale activations, so that sequences route apart) runs its
experts four ways, swapped into the same loaded model's ``FusedMoE.kernel`` slots (the engine
runs in this process):

- ``fused``: what the platform installs (on the CPU: the C++ grouped GEMM while every expert
  has at most 16 rows, torch's grouped GEMM past that);
- ``fused-torch``: the core's torch path alone (tokens sorted by expert, ``torch._grouped_mm``);
- ``dense``: every expert computed for every token, the unselected ones masked by a zero weight;
- ``loop``: a Python loop over the experts a step uses, each gathering its tokens
  (transformers' eager formulation).

Reported: tokens/s of the model's forward over a batch of ``--forward-tokens`` tokens (one
causal sequence, no KV cache: the MoE layers see the same rows as a step with that many
tokens), and output tokens/s of ``LLM.generate`` over ``--num-requests`` prompts
(``ignore_eos``); the ways alternate round by round, and each reports its best and median
run and the best's ratio to ``fused``'s best. ``PISTON_CPU_THREADS=1`` runs single-threaded,
which a busy machine disturbs less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ["PISTON_ENGINE_IN_PROCESS"] = "1"  # the model is this process's, so its kernels can be swapped

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from piston import LLM, SamplingParams  # noqa: E402
from piston.models.layers.fused_moe import FusedMoE  # noqa: E402


def dense_experts(x, w13, w2, topk_weights, topk_ids):
    """Every expert over every token, weighted by a dense [T, E] routing matrix (zeros for the
    experts a token did not pick)."""
    inter = w2.shape[2]
    h = torch.matmul(x, w13.transpose(1, 2))  # [E, T, 2I]
    y = torch.bmm(F.silu(h[..., :inter]) * h[..., inter:], w2.transpose(1, 2))  # [E, T, H]
    dense = torch.zeros(x.shape[0], w13.shape[0], dtype=torch.float32).scatter_(1, topk_ids, topk_weights)
    return (y * dense.T[..., None]).sum(dim=0).to(x.dtype)


def loop_experts(x, w13, w2, topk_weights, topk_ids):
    """One iteration per expert in use: gather its tokens, two GEMMs, scatter-add back."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in topk_ids.unique().tolist():
        tokens, slot = torch.where(topk_ids == e)
        h = F.linear(x[tokens], w13[e])
        y = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])
        out.index_add_(0, tokens, y * topk_weights[tokens, slot, None])
    return out.to(x.dtype)


def write_model(folder: str, args) -> str:
    from piston.model_resolver import default_model_path
    from piston.tokenizer import load_tokenizer

    config = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=49152,
                  hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                  num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                  num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=True, sliding_window=None,
                  bos_token_id=1, eos_token_id=2, hidden_act="silu", dtype="float32")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    load_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights of unit-scale activations in place of the dummy ones (whose near-zero
    router logits and identical outputs would send every sequence to the same two experts):
    norms 1, the embedding N(0, 1), every matrix N(0, 1 / fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else p.shape[-1] ** -0.5))


def report(what: str, rates: dict[str, list[float]]) -> None:
    """The best tokens/s of each way (other processes only ever slow a run down) and the median,
    with the best's ratio to fused."""
    fused = max(rates["fused"])
    print(f"{what} tok/s, best (median): " + ", ".join(
        f"{n} {max(r):.1f} ({statistics.median(r):.1f}) {max(r) / fused:.2f}x" for n, r in rates.items()))


def model_of(llm: LLM) -> torch.nn.Module:
    return llm.llm_engine.engine_core.engine_core.executor.worker.runner.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--inter", type=int, default=1408)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--forward-tokens", default="16,512")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="forward passes per way and round")
    args = parser.parse_args()

    folder = write_model(os.path.join(tempfile.gettempdir(), "piston-moe-bench"), args)
    # No prefix caching: every way of a round runs the same prompts, and each must prefill them.
    llm = LLM(folder, load_format="dummy", dtype="float32", kv_cache_memory="512MiB", seed=0,
              max_num_seqs=max(args.num_requests, 1), enable_prefix_caching=False)
    model = model_of(llm)
    randomize(model, seed=0)
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    installed = layers[0].kernel
    ways = {"fused": installed, "fused-torch": None, "dense": dense_experts, "loop": loop_experts}

    def use(kernel) -> None:
        for layer in layers:
            layer.kernel = kernel

    print(f"Mixtral-like: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of width "
          f"{args.inter}, top-{args.top_k}; float32, {torch.get_num_threads()} threads; installed kernel: "
          f"{'torch path' if installed is None else 'platform kernel'}")
    rng = np.random.default_rng(0)
    vocab = 49152
    for tokens in (int(t) for t in args.forward_tokens.split(",")):
        ids = torch.from_numpy(rng.integers(100, vocab - 100, tokens))
        positions = torch.arange(tokens)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        with torch.inference_mode():
            for kernel in ways.values():  # warm-up
                use(kernel)
                model(ids, positions)
            for _ in range(args.rounds * args.repeats):  # the ways alternate pass by pass
                for name, kernel in ways.items():
                    use(kernel)
                    start = time.perf_counter()
                    model(ids, positions)
                    rates[name].append(tokens / (time.perf_counter() - start))
        report(f"forward, {tokens} tokens", rates)

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for kernel in ways.values():  # warm-up
        use(kernel)
        llm.generate([[100] * 8] * 2, SamplingParams(max_tokens=2), use_tqdm=False)
    rates = {name: [] for name in ways}
    outputs = {}
    for r in range(args.rounds):
        prompts = [list(map(int, rng.integers(100, vocab - 100, args.input_len))) for _ in range(args.num_requests)]
        for name, kernel in ways.items():
            use(kernel)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
            outputs[name] = [o.outputs[0].token_ids for o in outs]
        print(f"generate round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in rates.items()))
    report(f"generate, {args.num_requests} requests x ({args.input_len} prompt + {args.output_len} output) "
           "tokens, output", rates)
    same = sum(outputs[n] == outputs["fused"] for n in ways)
    distinct = len({tuple(t) for t in outputs["fused"]})
    print(f"identical greedy tokens to fused: {same - 1} of {len(ways) - 1} other ways (float32 rounding may "
          f"differ); {distinct} distinct outputs of {len(outputs['fused'])} requests")
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()

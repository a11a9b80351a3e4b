"""Speculative decoding with n-gram drafts (or a draft model) on an input-grounded workload,
against the same engine without speculation, in one run.

    python benchmarks/spec_decode.py [--model MODEL] [--quantization none] [--k 4]
        [--output-len 256] [--batch-sizes 1,4,16,64] [--rounds 2]
        [--method draft_model [--draft-model PATH] [--draft-quantization auto]]

``--method draft_model`` drafts with a model instead; by default the target's own GGUF file
with its weights kept packed (self-speculation: a float32 target checked against its Q4_1
copy, llama.cpp's usual pairing of a model with a quantized draft).

The workload is code editing, the classic case for prompt lookup: each prompt shows a
function from Python's standard library (its source, so the text is fixed for a Python
version) and asks for it back with one identifier renamed. The answers are greedy, so both
engines produce the same tokens (the script asserts it) and tokens/s compare like for like.

Batch 1: the prompts one after another, ``--rounds`` times, the engines alternating, each
round timed separately. Reported: output tokens/s of each engine and their ratio per round,
the mean acceptance length (tokens per checked draft run, the bonus included), decode steps
per output token, and the milliseconds per decode step with and without drafts (where the
time goes: a step that checks k drafts costs more than a one-token step; the speed-up is
tokens per step over that cost).

Then ``--batch-sizes``: the same prompts, that many at once (cycled to fill the batch; their
prompts already in every engine's prefix cache, so mostly the decode is timed), with
speculation forced on at every batch size (``disable_by_batch_size`` 0) and without it, and
a third engine whose drafts are always rejected (benchmarks/rejected_drafts.py): the worst
case, what checking drafts costs when they never match, with the scheduler's back-off from
requests whose drafts keep missing. Together they show where drafts stop paying, which is
how the platform's default ``disable_by_batch_size`` is chosen.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import textwrap
import time

from piston import LLM, SamplingParams

SOURCES = [textwrap.TextWrapper._wrap_chunks, textwrap.dedent, statistics.mode, json.dumps,
           statistics.median, statistics.variance, inspect.getmodulename, textwrap.indent]
RENAMES = ["result", "value", "items", "data", "output", "acc", "buf", "tmp"]


def prompts(tokenizer, n: int) -> list[str]:
    out = []
    for i in range(n):
        fn = SOURCES[i % len(SOURCES)]
        code = inspect.getsource(fn)
        name = fn.__name__
        new = RENAMES[(i // len(SOURCES)) % len(RENAMES)]
        msg = (f"Rewrite this Python function with `{name}` renamed to `{name}_{new}`. Output only the code.\n\n"
               f"```python\n{code}```")
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                                 tokenize=False))
    return out


def run(llm: LLM, batch: list[str], params: SamplingParams, one_at_a_time: bool) -> dict:
    before = llm.llm_engine.get_stats()
    start = time.perf_counter()
    if one_at_a_time:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in batch]
    else:
        outs = llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - start
    after = llm.llm_engine.get_stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = sum(o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs)
    drafts = after.spec_num_drafts - before.spec_num_drafts
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    decode_tokens = tokens - len(outs)  # the first token of each comes from its prompt's step
    decode_steps = decode_tokens - accepted  # each decode step gives 1 + its accepted drafts
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "drafts": drafts,
            "draft_tokens": after.spec_num_draft_tokens - before.spec_num_draft_tokens, "accepted": accepted,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
            "steps_per_token": decode_steps / max(decode_tokens, 1),
            "ms_per_decode_step": 1000 * (wall - ttft) / max(decode_steps, 1) if one_at_a_time else None,
            "answers": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantization", default="none", help="none: SmolLM2 in float32 (the issue's case)")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--lookup-min", type=int, default=2)
    parser.add_argument("--lookup-max", type=int, default=5)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--method", default="ngram", choices=["ngram", "draft_model"])
    parser.add_argument("--draft-model", default=None, help="draft_model: the draft (default: the target itself)")
    parser.add_argument("--draft-quantization", default="auto",
                        help="draft_model: how the draft's weights are held (auto: packed for a GGUF file)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    spec = dict(method="ngram", num_speculative_tokens=args.k, prompt_lookup_min=args.lookup_min,
                prompt_lookup_max=args.lookup_max, disable_by_batch_size=0)
    if args.method == "draft_model":
        from piston.model_resolver import resolve_model

        spec = dict(method="draft_model", model=args.draft_model or resolve_model(args.model),
                    quantization=args.draft_quantization, num_speculative_tokens=args.k, disable_by_batch_size=0)
    common = dict(model=args.model, dtype="float32", quantization=args.quantization, max_model_len=2048,
                  kv_cache_memory="1GiB", seed=0)
    # The engine processes import the worst case's proposer from this folder.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    rejected = {**spec, "method": "rejected_drafts:RejectedDrafts", "model": None, "quantization": None}
    engines = {"plain": LLM(**common), args.method: LLM(**common, speculative_config=spec),
               "rejected": LLM(**common, speculative_config=rejected)}
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len)
    tok = engines["plain"].get_tokenizer()
    batch = prompts(tok, args.num_prompts)
    for llm in engines.values():  # warm-up: compile, fault the KV cache in, cache the prompts' prefixes
        llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)

    report: dict = {"args": vars(args), "batch1": [], "batched": []}
    print(f"Batch 1: {len(batch)} code-editing prompts, up to {args.output_len} greedy tokens each")
    for r in range(args.rounds):
        res = {name: run(llm, batch, params, one_at_a_time=True) for name, llm in engines.items()
               if name != "rejected"}
        assert res["plain"]["answers"] == res[args.method]["answers"], "speculation changed a greedy answer"
        p, s = res["plain"], res[args.method]
        print(f"  round {r + 1}: plain {p['tok_s']:.1f} tok/s ({p['ms_per_decode_step']:.1f} ms/step), "
              f"{args.method} {s['tok_s']:.1f} tok/s ({s['ms_per_decode_step']:.1f} ms/step, "
              f"{s['steps_per_token']:.2f} steps/token, mean acceptance length "
              f"{s['mean_acceptance_length']:.2f}, {s['accepted']}/{s['draft_tokens']} drafts accepted) "
              f"-> {s['tok_s'] / p['tok_s']:.2f}x")
        report["batch1"].append({k: {x: y for x, y in v.items() if x != "answers"} for k, v in res.items()})

    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    if sizes:
        print("Batched (all prompts at once; speculation forced on at every size):")
    for n in sizes:
        many = prompts(tok, n)
        for llm in engines.values():  # every engine's prefix cache holds these prompts: the decode is timed
            llm.generate(many, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        res = {name: run(llm, many, params, one_at_a_time=False) for name, llm in engines.items()}
        assert res["plain"]["answers"] == res[args.method]["answers"] == res["rejected"]["answers"], \
            "speculation changed a greedy answer"
        p, s, w = res["plain"], res[args.method], res["rejected"]
        print(f"  {n:3d} requests: plain {p['tok_s']:.1f} tok/s, {args.method} {s['tok_s']:.1f} tok/s "
              f"(mean acceptance length {s['mean_acceptance_length'] or 0:.2f}) -> {s['tok_s'] / p['tok_s']:.2f}x; "
              f"drafts always rejected {w['tok_s']:.1f} tok/s ({w['drafts']} draft runs) "
              f"-> {w['tok_s'] / p['tok_s']:.2f}x")
        report["batched"].append({"batch_size": n, **{k: {x: y for x, y in v.items() if x != "answers"}
                                                      for k, v in res.items()}})
    for llm in engines.values():
        llm.llm_engine.shutdown()
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

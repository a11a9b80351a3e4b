"""``piston bench throughput --structured-output json``: the cost of constrained decoding.

The same requests run with a JSON-schema constraint and without one, in one engine and
one run, in alternating rounds (so drift on a noisy machine falls on both). Each
unconstrained request is given the output length its constrained twin produced (greedy,
ignore_eos), so both sides generate exactly the same number of tokens, and the ratio of
their wall times is the constraint's whole cost: bitmasks filled in the engine, shipped
with the step, applied by the sampler, and matchers advanced.

The grammar is compiled in a warm-up round first (compiling is cached per schema); its
time is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

# A typical extraction schema whose shortest valid output (eight records) is longer than
# the default 128 output tokens, so requests run to their length rather than finish early.
DEFAULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "email": {"type": "string", "maxLength": 40},
                    "role": {"enum": ["admin", "editor", "viewer"]},
                    "active": {"type": "boolean"},
                },
                "required": ["name", "age", "email", "role", "active"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["records"],
    "additionalProperties": False,
}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("structured outputs")
    g.add_argument("--structured-output", choices=["json"], default=None,
                   help="also run every request under a JSON-schema constraint and report the ratio of the two "
                        "wall times (same tokens on both sides)")
    g.add_argument("--structured-output-schema", default=None,
                   help="a JSON schema file for --structured-output json (default: a list of eight records)")
    g.add_argument("--structured-output-rounds", type=int, default=3,
                   help="timed rounds of each kind, alternating")


def load_schema(args: argparse.Namespace) -> dict[str, Any]:
    if args.structured_output_schema is None:
        return DEFAULT_SCHEMA
    with open(args.structured_output_schema) as f:
        return json.load(f)


def compare(llm, prompts: list, output_lens: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Time the constrained and the unconstrained runs of ``prompts``; the figures."""
    from piston import SamplingParams
    from piston.step.sampling_params import StructuredOutputsParams

    constraint = StructuredOutputsParams(json=load_schema(args))
    greedy = dict(ignore_eos=True, temperature=0.0)
    constrained = [SamplingParams(max_tokens=n, structured_outputs=constraint, **greedy) for n in output_lens]

    t0 = time.perf_counter()
    llm.generate(prompts[:1], constrained[:1], use_tqdm=False)  # compiles the grammar (cached after)
    compile_s = time.perf_counter() - t0
    outputs = llm.generate(prompts, constrained, use_tqdm=False)
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    finish = [o.outputs[0].finish_reason for o in outputs]
    plain = [SamplingParams(max_tokens=n, **greedy) for n in lengths]

    times: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    for round_ in range(args.structured_output_rounds):
        order = ("constrained", "unconstrained") if round_ % 2 == 0 else ("unconstrained", "constrained")
        for kind in order:
            t0 = time.perf_counter()
            out = llm.generate(prompts, constrained if kind == "constrained" else plain, use_tqdm=False)
            times[kind].append(time.perf_counter() - t0)
            got = [len(o.outputs[0].token_ids) for o in out]
            if got != lengths:
                raise RuntimeError(f"the {kind} round generated {sum(got)} tokens, not {sum(lengths)}: "
                                   "the comparison would be unfair")
    ratios = [c / u for c, u in zip(times["constrained"], times["unconstrained"])]
    return {
        "kind": "json", "num_requests": len(prompts), "output_tokens": sum(lengths),
        "finish_reasons": {r: finish.count(r) for r in sorted(set(map(str, finish)))},
        "grammar_compile_s": compile_s,
        "constrained_s": times["constrained"], "unconstrained_s": times["unconstrained"],
        "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
        "overhead_median_pct": 100 * (statistics.median(ratios) - 1),
    }


def summary_rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("-- Structured output (json) --", None),
            ("Requests x output tokens", f"{r['num_requests']} x {r['output_tokens'] / r['num_requests']:.0f}"),
            ("First request, grammar compile (s)", r["grammar_compile_s"]),
            ("Constrained, median (s)", statistics.median(r["constrained_s"])),
            ("Unconstrained, median (s)", statistics.median(r["unconstrained_s"])),
            ("Constrained / unconstrained (median)", r["ratio_median"]),
            ("Overhead (%)", r["overhead_median_pct"])]

"""Where a step's time goes: every stage of the engine, timed, with the engine in this process.

    python benchmarks/profile_engine.py --tiny                  # 256 x 128 tokens -> 128, tiny model
    python benchmarks/profile_engine.py --model PATH --num-prompts 64 --min-input 32 --max-input 256 \\
        --output-len 96                                          # the 64-request SmolLM2 workload
    python benchmarks/profile_engine.py --tiny --cprofile 30     # plus a cProfile of the hottest functions
    python benchmarks/profile_engine.py --model PATH --structured-output json \
        --structured-outputs-backend guidance                     # every request under a JSON schema

Each stage is timed by wrapping the method that does it (no change to the engine itself):
the scheduler (schedule, update_from_output), the runner (applying the diff, flattening the
step's tokens, device inputs, the model's forward, the logits, sampling parameters, the
sampler, the output assembly), the IPC the two-process engine does per step (msgpack encode
and decode of the step's outputs, measured on the same messages), and the front end's output
processing (detokenization included), and with --structured-output the grammar work (filling
the bitmasks, advancing the matchers). Engine overhead is everything but the model's forward
and logits, as a share of wall time. The forward's time is also given by the step's size
(1 token, up to 8, 64, 256, 1024, 2048, more).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import random
import tempfile
import time
from collections import defaultdict

TIMES: dict[str, float] = defaultdict(float)
STEP_BUCKETS = (1, 8, 64, 256, 1024, 2048, float("inf"))  # the forward's steps by their tokens, at most
BY_SIZE: dict[float, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # bucket -> steps, seconds, tokens


def _timed(cls, name: str, label: str) -> None:
    """Wrap ``cls.name`` so its time adds up under ``label`` (a classmethod stays one)."""
    raw = cls.__dict__[name]
    is_classmethod = isinstance(raw, classmethod)
    fn = raw.__func__ if is_classmethod else raw

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - start

    setattr(cls, name, classmethod(wrapper) if is_classmethod else wrapper)


def instrument() -> None:
    import msgspec

    from piston.core.scheduler import Scheduler
    from piston.engine.engine_core import EngineCore
    from piston.engine.output_processor import OutputProcessor
    from piston.engine.structured_outputs import StructuredOutputs
    from piston.models.llama import LlamaForCausalLM
    from piston.step.engine_messages import EngineCoreOutputs
    from piston.step.input_batch import InputBatch
    from piston.step.model_runner import ModelRunner
    from piston.step.sampling_batch import SamplingBatch
    from piston.torch_runner.model_runner import TorchModelRunner
    from piston.torch_runner.sampler import Sampler

    for cls, name, label in [
        (Scheduler, "schedule", "scheduler.schedule"),
        (Scheduler, "update_from_output", "scheduler.update_from_output"),
        (ModelRunner, "execute_model", "runner.execute_model"),
        (InputBatch, "apply_diff", "runner.apply_diff"),
        (InputBatch, "schedule", "runner.flatten"),
        (TorchModelRunner, "forward", "runner.forward_total"),
        (LlamaForCausalLM, "forward", "model.forward"),
        (LlamaForCausalLM, "compute_logits", "model.logits"),
        (LlamaForCausalLM, "greedy_tokens", "model.greedy"),
        (TorchModelRunner, "sample", "runner.sample_total"),
        (SamplingBatch, "from_batch", "runner.sampling_params"),
        (TorchModelRunner, "_sampling_metadata", "runner.sampling_tensors"),
        (Sampler, "forward", "sampler"),
        (OutputProcessor, "process_outputs", "frontend.process_outputs"),
        (StructuredOutputs, "attach_bitmask", "grammar.bitmask"),
        (StructuredOutputs, "advance", "grammar.advance"),
    ]:
        _timed(cls, name, label)

    # The forward's time by the step's size (tokens), for the last table of the report.
    forward = LlamaForCausalLM.forward

    def forward_by_size(self, input_ids, positions):
        start = time.perf_counter()
        try:
            return forward(self, input_ids, positions)
        finally:
            bucket = next(b for b in STEP_BUCKETS if input_ids.numel() <= b)
            BY_SIZE[bucket][0] += 1
            BY_SIZE[bucket][1] += time.perf_counter() - start
            BY_SIZE[bucket][2] += input_ids.numel()

    LlamaForCausalLM.forward = forward_by_size

    # The two-process engine encodes each step's outputs and the front end decodes them.
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineCoreOutputs)
    step = EngineCore.step

    def step_with_ipc(self):
        outputs = step(self)
        start = time.perf_counter()
        decoder.decode(encoder.encode(outputs))
        TIMES["ipc.encode_decode"] += time.perf_counter() - start
        return outputs

    EngineCore.step = step_with_ipc


def report(wall: float, steps: int) -> dict[str, float]:
    t = TIMES
    rows = {
        "scheduler: schedule": t["scheduler.schedule"],
        "runner: apply the diff (InputBatch)": t["runner.apply_diff"],
        "runner: flatten the step's tokens": t["runner.flatten"],
        "runner: device inputs + attention metadata": t["runner.forward_total"] - t["model.forward"],
        "model: forward": t["model.forward"],
        "model: logits (lm_head)": t["model.logits"],
        "model: greedy tokens (the head's int8 screen)": t["model.greedy"],
        "runner: sampling parameters (SamplingBatch + tensors)": t["runner.sampling_params"]
        + t["runner.sampling_tensors"],
        "runner: sampler": t["sampler"],
        "runner: output assembly": t["runner.execute_model"] - t["runner.apply_diff"] - t["runner.flatten"]
        - t["runner.forward_total"] - t["runner.sample_total"] - t["runner.sampling_params"],
        "scheduler: update_from_output": t["scheduler.update_from_output"],
        "grammar: fill the bitmasks": t["grammar.bitmask"],
        "grammar: advance the matchers": t["grammar.advance"],
        "IPC: encode + decode the step's outputs": t["ipc.encode_decode"],
        "front end: output processing + detokenization": t["frontend.process_outputs"],
    }
    rows["other (LLM loop, gaps)"] = wall - sum(rows.values())
    print(f"\n{'stage':56s} {'total s':>8s} {'ms/step':>8s} {'share':>7s}")
    for name, seconds in rows.items():
        print(f"{name:56s} {seconds:8.2f} {1000 * seconds / steps:8.2f} {100 * seconds / wall:6.1f}%")
    model = t["model.forward"] + t["model.logits"] + t["model.greedy"]
    print(f"{'wall':56s} {wall:8.2f} {1000 * wall / steps:8.2f}  {steps} steps")
    print(f"model forward + logits (or greedy tokens) {model:.2f} s; engine overhead {wall - model:.2f} s "
          f"= {100 * (wall - model) / wall:.1f}% of wall time")
    print(f"\n{'the forward by step size (tokens)':40s} {'steps':>6s} {'total s':>8s} {'ms/step':>8s} {'us/token':>9s}")
    low = 0
    for bucket in STEP_BUCKETS:
        n, seconds, tokens = BY_SIZE.get(bucket, (0, 0.0, 0))
        if n:
            label = f"{low + 1}-{bucket}" if bucket != float("inf") else f"over {low}"
            print(f"{label:40s} {n:6d} {seconds:8.2f} {1000 * seconds / n:8.2f} {1e6 * seconds / tokens:9.1f}")
        low = bucket
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tiny", action="store_true", help="the 19M-parameter tiny model, dummy weights")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--min-input", type=int, default=None)
    parser.add_argument("--max-input", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--cprofile", type=int, default=0, help="also print the top N functions by own time")
    parser.add_argument("--structured-output", choices=["json"], default=None,
                        help="constrain every request by the JSON schema of `piston bench throughput`")
    parser.add_argument("--structured-outputs-backend", default="auto")
    args = parser.parse_args()
    defaults = (256, 128, 128, 128) if args.tiny else (64, 32, 256, 96)
    num, lo, hi, out = (v if v is not None else d for v, d in zip(
        (args.num_prompts, args.min_input, args.max_input, args.output_len), defaults))
    os.environ["PISTON_ENGINE_IN_PROCESS"] = "1"  # the whole engine in this process

    from piston import LLM, SamplingParams

    kwargs = dict(max_num_seqs=args.max_num_seqs, structured_outputs_backend=args.structured_outputs_backend,
                  kv_cache_dtype=args.kv_cache_dtype)
    model = args.model
    if args.tiny:
        from tiny_model import write_tiny_model

        model = write_tiny_model(os.path.join(tempfile.gettempdir(), "piston-tiny19m"))
        kwargs["load_format"] = "dummy"
    llm = LLM(model, **kwargs)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(lo, hi))] for _ in range(num)]
    constraint = None
    if args.structured_output:
        from piston.bench.structured import DEFAULT_SCHEMA
        from piston.step.sampling_params import StructuredOutputsParams

        constraint = StructuredOutputsParams(json=DEFAULT_SCHEMA)
    params = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0, structured_outputs=constraint)
    warmup = [[rng.randrange(100, 40000) for _ in range(16)] for _ in range(2)]  # not the prompts: no prefix hits
    llm.generate(warmup, SamplingParams(max_tokens=2, structured_outputs=constraint), use_tqdm=False)
    instrument()
    from piston.engine.engine_core import EngineCore

    steps_before = llm.llm_engine.engine_core.engine_core.num_steps if hasattr(
        llm.llm_engine.engine_core, "engine_core") and isinstance(llm.llm_engine.engine_core.engine_core,
                                                                    EngineCore) else 0
    profiler = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - start
    steps = llm.llm_engine.engine_core.engine_core.num_steps - steps_before
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{num} prompts of {lo}-{hi} tokens -> {out} tokens: {wall:.2f} s, {generated / wall:.1f} output tok/s")
    report(wall, steps)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()

"""Bytes the EngineCore broadcasts to the tensor-parallel workers per step.

Runs ``--num-prompts`` requests through an in-process engine with the mp executor and
records the size of every step's encoded broadcast (the scheduler's diff). Prints the
figure for steps where every running request decodes one token and no request is new,
which is what the issue asks for ("a batch of 64 decodes"), next to the prefill steps.

    python benchmarks/tp_step_bytes.py --num-prompts 64 [--model PATH] [--tp 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the built-in SmolLM2)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--request-id-prefix", default="cmpl-0123456789abcdef0123456789abcdef-",
                        help="ids like the server's (the LLM class uses '0', '1', ...)")
    args = parser.parse_args()
    os.environ["PISTON_ENGINE_IN_PROCESS"] = "1"

    from piston import LLM, SamplingParams

    llm = LLM(model=args.model, tensor_parallel_size=args.tp, distributed_executor_backend="mp",
              kv_cache_memory="512MiB", max_model_len=1024)
    engine = llm.llm_engine
    executor = engine.engine_core.engine_core.executor
    records = []
    original = executor.execute_model

    def recording(so):
        out = original(so)
        records.append((executor.last_broadcast_bytes, len(so.scheduled_new_reqs), len(so.num_scheduled_tokens),
                        so.total_num_scheduled_tokens))
        return out

    executor.execute_model = recording
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    prompt = list(range(1000, 1000 + args.input_len))
    for i in range(args.num_prompts):
        engine.add_request(f"{args.request_id_prefix}{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()

    n = args.num_prompts
    decode = [b for b, new, reqs, toks in records if new == 0 and reqs == n and toks == n]
    prefill = [b for b, new, _, _ in records if new > 0]
    if not decode:
        sys.exit("no step decoded every request at once; raise --kv-cache-memory or lower --num-prompts")
    print(f"tensor_parallel_size={args.tp}, {n} requests, prompt {args.input_len} tokens, "
          f"request ids like {args.request_id_prefix!r}+i")
    print(f"decode step ({n} running, 1 token each): median {statistics.median(decode):.0f} bytes "
          f"({statistics.median(decode) / n:.1f} bytes per request), max {max(decode)} bytes, {len(decode)} steps")
    print(f"steps with new requests (prompts in full): median {statistics.median(prefill):.0f} bytes, "
          f"max {max(prefill)} bytes, {len(prefill)} steps")


if __name__ == "__main__":
    main()

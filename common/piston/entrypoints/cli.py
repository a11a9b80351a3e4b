"""The ``piston`` command line."""

from __future__ import annotations

import argparse
import sys

from piston.engine.arg_utils import EngineArgs
from piston.hal.registry import PlatformError


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--max-tokens", type=int, default=64)
    add("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add("--top-p", type=float, default=1.0)
    add("--top-k", type=int, default=0)
    add("--min-p", type=float, default=0.0)
    add("--repetition-penalty", type=float, default=1.0)
    add("--presence-penalty", type=float, default=0.0)
    add("--frequency-penalty", type=float, default=0.0)
    add("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    add("--n", type=int, default=1)
    add("--stop", action="append", default=None, help="stop string (repeatable)")
    add("--ignore-eos", action="store_true")


def cmd_generate(args: argparse.Namespace) -> int:
    from piston import LLM, SamplingParams

    params = SamplingParams(
        n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params,
                           use_tqdm=len(args.prompts) > 1)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=len(args.prompts) > 1)
    for out in outputs:
        for completion in out.outputs:
            if len(outputs) > 1 or len(out.outputs) > 1:
                print(f"--- prompt {out.request_id}, completion {completion.index} "
                      f"({completion.finish_reason})")
            print(completion.text if args.chat or args.no_echo else out.prompt + completion.text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from piston.entrypoints.openai.api_server import run_server

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"Two models named: {args.model_tag!r} and --model {args.model!r}; "
                             "give one.")
        args.model = args.model_tag
    return run_server(args)


def _add_serve_parser(sub) -> None:
    from piston.entrypoints.openai.server_config import ServerConfig

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="Hugging Face folder, .gguf file or hub id (same as --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients use (default: MODEL as given)")
    ServerConfig.add_cli_args(serve)
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(func=cmd_serve)


BENCH_TOOLS = {
    "throughput": "offline generation through LLM: tokens/s, roofline, memory, start-up",
    "latency": "end-to-end latency of one batch: mean, p50, p99, time per output token",
    "serve": "load a running server with streamed requests: TTFT, TPOT, ITL, goodput",
}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"piston.bench.{args.bench_tool}").main(args)


def _add_bench_parser(sub, tool_named: str | None) -> None:
    """`piston bench TOOL`; a tool's flags come from its module, imported only when the
    command line names that tool, so other commands start without it."""
    import importlib

    bench = sub.add_parser("bench", help="benchmark throughput, latency or a running server")
    tools = bench.add_subparsers(dest="bench_tool", required=True)
    for name, help_text in BENCH_TOOLS.items():
        tool = tools.add_parser(name, help=help_text, description=help_text)
        if name == tool_named:
            importlib.import_module(f"piston.bench.{name}").add_cli_args(tool)
        tool.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="piston", description="Piston LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline from one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    gen.add_argument("--no-echo", action="store_true", help="print only the generated text")
    _add_sampling_args(gen)
    EngineArgs.add_cli_args(gen)
    gen.set_defaults(func=cmd_generate)
    _add_serve_parser(sub)
    _add_bench_parser(sub, argv[1] if len(argv) > 1 and argv[0] == "bench" else None)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, PlatformError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""ServerConfig: the HTTP server's own settings: access, and a limit on everything a request controls.

Engine-wide limits live in EngineArgs (``--max-logprobs``, ``--max-model-len``); these are
the server's. Every one has a flag and a default, and a request past one gets a 400 (413
for the body, 503 with Retry-After at capacity) naming the parameter and the limit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass

from piston.step.config import parse_size

API_KEY_ENV = "PISTON_API_KEY"
DEV_MODE_ENV = "PISTON_SERVER_DEV_MODE"
RUNTIME_LORA_ENV = "PISTON_ALLOW_RUNTIME_LORA_UPDATING"
MAX_LORA_NAME_CHARS = 256


def runtime_lora_updating_allowed() -> bool:
    """PISTON_ALLOW_RUNTIME_LORA_UPDATING is "1" or "true" (any case), as vLLM reads its own."""
    return os.environ.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


@dataclass(frozen=True)
class LoRAModulePath:
    """One ``--lora-modules`` entry."""

    name: str
    path: str
    base_model_name: str | None = None

    def __str__(self) -> str:
        return f"{self.name}={self.path}"


def parse_lora_module(value: str) -> LoRAModulePath:
    """``name=path`` or ``{"name": ..., "path": ..., "base_model_name": ...}`` (argparse type)."""
    text = value.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not valid JSON ({e}).") from None
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError(f"{value!r}: give a JSON object.")
        unknown = sorted(set(spec) - {"name", "path", "base_model_name"})
        if unknown:
            raise argparse.ArgumentTypeError(f"{value!r}: unknown key(s) {', '.join(unknown)}; an entry has name, "
                                             "path and optionally base_model_name.")
        name, path, base = spec.get("name"), spec.get("path"), spec.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise argparse.ArgumentTypeError(f"{value!r}: base_model_name must be a string.")
    elif "=" in text:
        name, path = text.split("=", 1)
        base = None
    else:
        raise argparse.ArgumentTypeError(f"{value!r}: give name=path or a JSON object "
                                         '{"name": ..., "path": ..., "base_model_name": ...}.')
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_LORA_NAME_CHARS:
        raise argparse.ArgumentTypeError(f"{value!r}: the adapter's name must be 1 to {MAX_LORA_NAME_CHARS} "
                                         "characters.")
    if not isinstance(path, str) or not path.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: the adapter's path (its PEFT folder) is missing.")
    return LoRAModulePath(name.strip(), path.strip(), base or None)


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    # Keys accepted in 'Authorization: Bearer <key>' on /v1 (any one of them); () = open.
    api_keys: tuple[str, ...] = ()
    # Require a key on /metrics too (it is open by default, for scrapers).
    metrics_require_api_key: bool = False
    # Only callers who sent a valid API key may set a priority ahead of the default (< 0).
    restrict_priority: bool = False
    max_n: int = 16
    # Prompts in one /v1/completions request; n times the prompts is bounded by it too.
    max_prompts_per_request: int = 64
    max_stop_sequences: int = 16
    max_stop_token_ids: int = 64
    max_request_body_bytes: int = 16 * 2**20
    # Engine requests that may wait beyond the max_num_seqs running ones; None = no bound.
    max_waiting_requests: int | None = 1024
    # How tool calls are found in free text (tool_choice "auto"): "hermes" or "llama3_json".
    tool_call_parser: str = "hermes"
    # A Jinja chat template used instead of the model's own (the text, read from --chat-template).
    chat_template: str | None = None
    # Append each finished request's stage timestamps here (piston.entrypoints.openai.request_timeline).
    request_timeline_file: str | None = None
    # The development endpoints: /sleep, /wake_up, /is_sleeping, /reset_prefix_cache
    # (piston.entrypoints.openai.dev_endpoints); off, they are 404.
    dev_mode: bool = False
    # LoRA adapters served from start-up (--lora-modules; the engine needs --enable-lora).
    lora_modules: tuple[LoRAModulePath, ...] = ()
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with --enable-lora only); off,
    # they are 404. Read from $PISTON_ALLOW_RUNTIME_LORA_UPDATING, as vLLM reads its own flag.
    allow_runtime_lora_updating: bool = False

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = ServerConfig("")
        add = parser.add_argument
        add("--api-key", action="append", default=None,
            help=f"require 'Authorization: Bearer <key>' on every /v1 route; repeat for several keys. "
                 f"Also read from ${API_KEY_ENV} and --api-key-file (which keep the key out of `ps`)")
        add("--api-key-file", default=None, help="a file of API keys, one per line")
        add("--metrics-require-api-key", action="store_true", help="require an API key on /metrics too")
        add("--restrict-priority", action="store_true",
            help="only callers with a valid API key may set a priority ahead of the default (priority < 0)")
        add("--max-n", type=int, default=d.max_n, help="the most completions (n) one request may ask for")
        add("--max-prompts-per-request", type=int, default=d.max_prompts_per_request,
            help="the most prompts in one /v1/completions request (and the most prompts x n)")
        add("--max-stop-sequences", type=int, default=d.max_stop_sequences, help="the most stop strings per request")
        add("--max-stop-token-ids", type=int, default=d.max_stop_token_ids,
            help="the most stop_token_ids per request")
        add("--max-request-body-bytes", default=str(d.max_request_body_bytes),
            help="the largest request body, e.g. 16MiB (413 past it)")
        add("--tool-call-parser", default=d.tool_call_parser, choices=["hermes", "llama3_json"],
            help="how tool calls are found in the model's text when tool_choice is auto")
        add("--chat-template", default=None,
            help="a Jinja chat template (a file, or the template itself) to use instead of the model's, "
                 "e.g. one that shows tools to the model (examples/tool_chat_template_hermes.jinja)")
        add("--request-timeline-file", default=None, metavar="PATH",
            help="append one JSON line per finished request: when it passed each stage from HTTP "
                 "receive to its first streamed chunk (benchmarks/request_timeline.py reads it)")
        add("--dev-mode", action="store_true", default=os.environ.get(DEV_MODE_ENV, "") == "1",
            help=f"serve the development endpoints (POST /sleep?level=1|2, POST /wake_up?tags=weights|kv_cache, "
                 f"GET /is_sleeping, POST /reset_prefix_cache), behind the API key when one is set; "
                 f"also on with {DEV_MODE_ENV}=1")
        add("--lora-modules", nargs="+", action="extend", type=parse_lora_module, default=None,
            metavar="NAME=PATH",
            help="LoRA adapters to serve (needs --enable-lora): name=path, or vLLM's JSON form "
                 "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; requests name one in `model`. Each "
                 "is checked at start-up; they get lora_int_id 1, 2, ... in order. Loading and unloading at run "
                 f"time (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) needs {RUNTIME_LORA_ENV}=1")
        add("--max-waiting-requests", type=int, default=d.max_waiting_requests,
            help="engine requests that may wait beyond the running max_num_seqs; past it new requests get 503 "
                 "with Retry-After (-1: no bound)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, served_model_name: str) -> "ServerConfig":
        keys = list(args.api_key or [])
        if os.environ.get(API_KEY_ENV):
            keys.append(os.environ[API_KEY_ENV])
        if args.api_key_file:
            with open(args.api_key_file) as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        config = cls(
            served_model_name=served_model_name, api_keys=tuple(dict.fromkeys(keys)),
            metrics_require_api_key=args.metrics_require_api_key, restrict_priority=args.restrict_priority,
            max_n=args.max_n, max_prompts_per_request=args.max_prompts_per_request,
            max_stop_sequences=args.max_stop_sequences, max_stop_token_ids=args.max_stop_token_ids,
            max_request_body_bytes=parse_size(args.max_request_body_bytes),
            max_waiting_requests=None if args.max_waiting_requests < 0 else args.max_waiting_requests,
            tool_call_parser=args.tool_call_parser, chat_template=read_chat_template(args.chat_template),
            request_timeline_file=getattr(args, "request_timeline_file", None),
            dev_mode=getattr(args, "dev_mode", False),
            lora_modules=tuple(getattr(args, "lora_modules", None) or ()),
            allow_runtime_lora_updating=runtime_lora_updating_allowed())
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("max_n", "max_prompts_per_request", "max_stop_sequences", "max_stop_token_ids",
                     "max_request_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.metrics_require_api_key and not self.api_keys:
            raise ValueError("--metrics-require-api-key needs an API key (--api-key, --api-key-file or "
                             f"${API_KEY_ENV}).")
        seen: set[str] = set()
        for m in self.lora_modules:
            if m.name == self.served_model_name:
                raise ValueError(f"--lora-modules {m}: {m.name!r} is the base model's served name; give the "
                                 "adapter another name.")
            if m.name in seen:
                raise ValueError(f"--lora-modules: two adapters are named {m.name!r}.")
            seen.add(m.name)

    def client_of_key(self, key: str) -> str:
        """A stable name for an API key's holder (the fair policy shares by it; the key
        itself never reaches the engine or its logs)."""
        return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the template given inline."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template.")

"""Benchmark tools behind ``piston bench {throughput,latency,serve}``.

This module holds what every tool shares: the run's metadata (machine, commit,
date), percentile summaries and the JSON report writer.
"""

from __future__ import annotations

import datetime
import json
import os
import platform as _platform
import subprocess
from typing import Any

import numpy as np


def engine_threads() -> int:
    """The torch thread count the CPU engine uses ($PISTON_CPU_THREADS, else every core)."""
    return int(os.environ.get("PISTON_CPU_THREADS", "0")) or os.cpu_count() or 1


def git_commit() -> dict[str, Any]:
    """The commit of the checkout Piston runs from: {"commit", "dirty"}; nulls outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", here, "status", "--porcelain", "-uno"],
                                capture_output=True, text=True, timeout=10).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(platform_name: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on: device, CPU count, torch version and threads."""
    import torch

    info: dict[str, Any] = {"hostname": _platform.node(), "cpu_count": os.cpu_count(),
                            "cpu": _platform.processor() or _platform.machine(),
                            "torch": torch.__version__, "torch_threads": engine_threads()}
    try:
        from piston.hal.registry import get_platform

        cls = get_platform(platform_name)
        info.update(platform=cls.name, device=cls.device_name())
    except Exception as e:  # the client of `bench serve` may run where no platform is usable
        info.update(platform=None, device=f"unknown ({type(e).__name__})")
    return info


def run_metadata(tool: str, args: Any, platform_name: str | None = None) -> dict[str, Any]:
    """The header of every report: tool, settings, machine, git commit, UTC date."""
    settings = {k: v for k, v in vars(args).items() if k != "func"} if args is not None else {}
    return {"tool": tool, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "git": git_commit(), "machine": machine_info(platform_name), "settings": settings}


def describe_model(model_config) -> dict[str, Any]:
    """The model as a report names it: what the user gave, the local path, dtype, shape."""
    hf = model_config.hf_config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return {"name": model_config.model, "path": model_config.path, "dtype": str(model_config.dtype),
            **{k: getattr(hf, k, None) for k in keys}}


def summarize(values: list[float] | np.ndarray, percentiles=(50, 90, 99)) -> dict[str, float]:
    """mean, std and the given percentiles of ``values`` (zeros when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": 0.0, "std": 0.0, **{f"p{p}": 0.0 for p in percentiles}}
    out = {"mean": float(arr.mean()), "std": float(arr.std())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in percentiles})
    return out


def spec_decode_figures(stats) -> dict[str, Any] | None:
    """Speculative decoding's acceptance from the engine's stats (SchedulerStats); None when
    no draft was checked. Mean acceptance length: tokens per draft run, the bonus included."""
    if not stats.spec_num_drafts:
        return None
    return {"num_drafts": stats.spec_num_drafts, "num_draft_tokens": stats.spec_num_draft_tokens,
            "num_accepted_tokens": stats.spec_num_accepted_tokens,
            "acceptance_rate": stats.spec_num_accepted_tokens / max(stats.spec_num_draft_tokens, 1),
            "mean_acceptance_length": 1 + stats.spec_num_accepted_tokens / stats.spec_num_drafts,
            "accepted_per_position": list(stats.spec_accepted_per_pos)}


def spec_decode_rows(spec: dict[str, Any] | None) -> list[tuple[str, Any]]:
    if spec is None:
        return []
    return [("-- Speculative decoding --", None),
            ("Draft runs / draft tokens", f"{spec['num_drafts']} / {spec['num_draft_tokens']}"),
            ("Acceptance rate (%)", 100 * spec["acceptance_rate"]),
            ("Mean acceptance length (tokens)", spec["mean_acceptance_length"])]


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` (if given) as indented JSON; non-finite floats become null."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(report), f, indent=2, default=str)
        f.write("\n")
    print(f"Wrote {path}")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    """A vLLM-style boxed summary: one ``label: value`` per line."""
    width = 60
    print(f"{'=' * 16} {title} {'=' * max(0, width - 18 - len(title))}")
    for label, value in rows:
        if label.startswith("--"):
            print(f"{label.strip('-').strip():-^{width}}")
            continue
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{label + ':':<44}{text:>16}")
    print("=" * width)

"""CompileCache: Inductor-compiled pieces on disk, keyed by what the piece computes.

A piece's key hashes its graph's structure (ops and how they connect, with nodes named
by position, so the identical middle pieces of a model share one key), the dtypes and
shapes of its inputs (the dynamic ``num_tokens`` stays a symbol), the torch version and
the device (Inductor's CPU code is built for the host's instruction set). Weights are
inputs of the pieces, never baked in, so one cached piece serves any checkpoint of the
same architecture. Artifacts are written atomically; an unreadable one is a miss.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx

logger = logging.getLogger(__name__)

# Bump when the key or the artifact layout changes, so old entries are never read.
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$PISTON_CACHE_DIR/compile``, else ``$XDG_CACHE_HOME/piston/compile`` (~/.cache)."""
    root = os.environ.get("PISTON_CACHE_DIR")
    if root:
        return Path(root) / "compile"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "piston" / "compile"


def device_fingerprint(device: torch.device) -> str:
    """What compiled code depends on besides the graph: the device model and ISA."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}:cuda{torch.version.cuda}"
    return f"{device.type}:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T({value.dtype},{tuple(str(s) for s in value.shape)},{tuple(str(s) for s in value.stride())})"
    if isinstance(value, torch.SymInt):
        return f"SymInt({value.node.expr})"
    return repr(value)


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', None) or getattr(target, '__name__', None) or target}"


def graph_key(gm: fx.GraphModule, example_inputs: Sequence[Any], extra: str = "") -> str:
    """A hash of the piece's computation and its inputs' types (names do not count)."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    lines = [f"format={CACHE_FORMAT_VERSION}", f"torch={torch.__version__}", f"python={sys.version_info[:2]}",
             extra]
    for value in example_inputs:
        lines.append("in " + _describe_value(value))
    for node in gm.graph.nodes:
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        # A placeholder's name is where its value came from (a layer's weight): not part of the key.
        target = "" if node.op == "placeholder" else _target_name(node)
        line = f"{index[node]} {node.op} {target} {args!r}"
        if node.op == "get_attr":
            # A constant tensor is compiled into the artifact: its bytes belong in the key.
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                data = value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                line += f" sha={hashlib.sha256(data).hexdigest()} {_describe_value(value)}"
        lines.append(line)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class CompileCache:
    """A folder of compiled pieces; counts hits and misses of this process."""

    def __init__(self, directory: str | os.PathLike | None = None, enabled: bool = True) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.inductor"

    def load(self, key: str) -> Any | None:
        """The compiled artifact stored under ``key``, or None (a miss)."""
        path = self.path(key)
        if not self.enabled or not path.is_file():
            self.misses += self.enabled
            return None
        import torch._inductor

        try:
            artifact = torch._inductor.CompiledArtifact.load(path=str(path), format="binary")
        except Exception as e:  # a torn or stale file must not stop start-up
            logger.warning("Ignoring unreadable compile cache entry %s (%s); recompiling.", path, e)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return artifact

    def save(self, key: str, artifact: Any) -> None:
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            artifact.save(path=str(tmp), format="binary")
            os.replace(tmp, path)
        except Exception as e:  # a read-only or full disk only costs the next start-up
            logger.warning("Could not write compile cache entry %s: %s", path, e)
            tmp.unlink(missing_ok=True)

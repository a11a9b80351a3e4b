"""CompiledModel: what the runner calls instead of the eager model when compilation is on.

``compile_model`` reads the engine config, decides eager or piecewise, traces and
compiles the model (piston.compilation.piecewise) and logs the time it took.
``CompiledModel.__call__`` pads the step to a capture size, runs the split graph (the
strategy replays captured graphs where it has them) and returns the real rows.
``capture_graphs`` has the runner run a dummy decode batch of every capture size, largest
first, so a capturing strategy records its graphs before the first request.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from piston.compilation.capture import CaptureStrategy, NoCapture
from piston.compilation.compile_cache import CompileCache, device_fingerprint
from piston.compilation.piecewise import PieceCompiler, SplitModel, trace_and_split

logger = logging.getLogger(__name__)


class CompiledModel:
    """``(input_ids [T], positions [T]) -> hidden [T, hidden]`` through the split, compiled graph."""

    def __init__(self, split: SplitModel, strategy: CaptureStrategy, cache: CompileCache | None = None) -> None:
        self.split = split
        self.strategy = strategy
        self.cache = cache
        self.graph = split.graph
        self._plan = split.input_plan
        self._template = [value if kind == "const" else None for kind, value in self._plan]
        self._slots = [(i, kind) for i, (kind, _) in enumerate(self._plan) if kind != "const"]

    @property
    def num_pieces(self) -> int:
        return len(self.split.piece_names)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[0]
        padded = self.strategy.padded_num_tokens(n)
        input_ids, positions = self.strategy.pad_inputs(input_ids, positions, padded)
        self.strategy.begin_step(padded)
        args = list(self._template)
        for i, kind in self._slots:
            args[i] = input_ids if kind == "input_ids" else positions if kind == "positions" else padded
        hidden = self.graph(*args)[0]
        return hidden if padded == n else hidden[:n]


def resolve_mode(config: Any, platform_default: str) -> str:
    """"eager" or "piecewise": --enforce-eager wins, "auto" takes the platform's default."""
    if config.model_config.enforce_eager:
        return "eager"
    mode = config.compilation_config.mode
    if mode == "auto":
        mode = platform_default
    if mode not in ("eager", "piecewise"):
        raise ValueError(f"compilation mode {mode!r} is unknown; use auto, eager or piecewise.")
    return mode


def compile_model(model: nn.Module, config: Any, device: torch.device, attn_layers: dict[int, Any],
                  strategy: CaptureStrategy | None = None, platform_default: str = "eager",
                  backend: str = "inductor") -> CompiledModel | None:
    """The piecewise-compiled model, or None when the config resolves to eager.

    ``strategy`` defaults to ``NoCapture`` with the config's explicit capture sizes.
    ``backend`` "eager" splits without Inductor (fast; for tests of the splitting).
    """
    if resolve_mode(config, platform_default) == "eager":
        return None
    cc = config.compilation_config
    if strategy is None:
        strategy = NoCapture(cc.capture_sizes or ())
    cache = CompileCache(cc.cache_dir)
    compiler = PieceCompiler(backend, cache, device_fingerprint(device))
    split = trace_and_split(model, device, attn_layers, compiler, strategy.wrap_piece)
    sources: dict[str, int] = {}
    for piece in split.pieces:
        sources[piece.source] = sources.get(piece.source, 0) + 1
    logger.info("Compiled the model in %.2f s (trace %.2f s, pieces %.2f s): %d pieces split at %d attention "
                "calls, backend %s, strategy %s; pieces by source %s; compile cache %s (%d hits, %d misses).",
                split.trace_seconds + split.compile_seconds, split.trace_seconds, split.compile_seconds,
                len(split.piece_names), len(split.attention_names), backend, strategy.name, sources,
                cache.directory, cache.hits, cache.misses)
    return CompiledModel(split, strategy, cache)


def capture_graphs(compiled: CompiledModel, dummy_forward: Callable[[int], None]) -> float:
    """Call ``dummy_forward(size)`` (one forward pass of a ``size``-token decode batch through
    ``compiled``, in a forward context) for each capture size, largest first, inside the
    strategy's ``capturing()``; returns the seconds it took (0 when it captures nothing)."""
    strategy = compiled.strategy
    if not strategy.captures_graphs or not strategy.capture_sizes:
        return 0.0
    start = time.perf_counter()
    with torch.inference_mode(), strategy.capturing():
        for size in sorted(strategy.capture_sizes, reverse=True):
            dummy_forward(size)
    seconds = time.perf_counter() - start
    logger.info("Captured %s graphs for %d sizes (%s) x %d pieces in %.2f s.", strategy.name,
                len(strategy.capture_sizes), ",".join(map(str, strategy.capture_sizes)), compiled.num_pieces,
                seconds)
    return seconds

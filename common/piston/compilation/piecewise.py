"""Piecewise compilation: trace the model once, split it at attention, compile each piece.

Dynamo traces ``model(input_ids, positions)`` once with ``num_tokens`` marked dynamic.
Our backend splits the FX graph at every ``piston::attention`` call, so a Llama-style
model of L layers becomes L + 1 compiled pieces with L eager attention calls between
them, then compiles each piece with Inductor (dynamic in ``num_tokens``; a failure falls
back to running that piece eagerly). Identical pieces (the middle layers) compile once.

After the trace the split graph is called directly, bypassing Dynamo's guards: the
graph's inputs are the two model inputs, their length, and the model's own parameters
and buffers, which must keep their storage (load weights with ``copy_``, never reassign).
"""

from __future__ import annotations

import inspect
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from piston.attention.forward_context import ForwardContext, set_forward_context
from piston.compilation.attention_op import bypass_dispatcher, is_attention_node
from piston.compilation.compile_cache import CompileCache, graph_key

logger = logging.getLogger(__name__)

BACKENDS = ("inductor", "eager")
# Traced length: not 0 or 1 (Dynamo specializes those) and unlikely to equal a model dim.
TRACE_NUM_TOKENS = 13


@dataclass
class PieceStats:
    name: str
    num_ops: int
    source: str  # "compiled", "cache", "shared" (same as an earlier piece), "eager", "eager-fallback"
    seconds: float


@dataclass
class SplitModel:
    """The split graph and what it took to build it."""

    graph: fx.GraphModule  # calls pieces and attention submodules in model order
    piece_names: list[str]  # the compiled pieces, in order
    attention_names: list[str]
    input_plan: list[tuple[str, Any]]  # per graph input: ("input_ids"|"positions"|"num_tokens", None) or ("const", v)
    pieces: list[PieceStats] = field(default_factory=list)
    trace_seconds: float = 0.0
    compile_seconds: float = 0.0


def split_at_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str], list[str]]:
    """Split ``gm`` so every attention call is a submodule of its own.

    Returns (split graph, names of the pieces between attention calls, names of the
    attention submodules), both in execution order.
    """
    partition: dict[fx.Node, int] = {}
    attention_ids: set[int] = set()
    pid = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_attention_node(node):
            pid += 1
            partition[node] = pid
            attention_ids.add(pid)
            pid += 1
        else:
            partition[node] = pid
    split = split_returning_tuples(gm, lambda node: partition[node])
    used = sorted(set(partition.values()))
    pieces = [f"submod_{i}" for i in used if i not in attention_ids]
    attention = [f"submod_{i}" for i in sorted(attention_ids)]
    return split, pieces, attention


# torch >= 2.12 can make every submodule return a tuple; older releases return a lone
# output bare, which split_returning_tuples then wraps itself.
SPLIT_HAS_TUPLE_RETURN = "tuple_return" in inspect.signature(split_module).parameters


def split_returning_tuples(gm: fx.GraphModule, partition: Callable[[fx.Node], int]) -> fx.GraphModule:
    """``split_module`` whose submodules all return tuples (pieces and their CUDA graphs
    hand outputs on as tuples), on any torch release."""
    if SPLIT_HAS_TUPLE_RETURN:
        return split_module(gm, None, partition, keep_original_order=True, tuple_return=True)
    split = split_module(gm, None, partition, keep_original_order=True)
    for node in list(split.graph.nodes):
        if node.op != "call_module":
            continue
        sub = split.get_submodule(node.target)
        output = next(n for n in sub.graph.nodes if n.op == "output")
        if isinstance(output.args[0], (tuple, list)):
            continue
        output.args = ((output.args[0],),)
        sub.recompile()
        with split.graph.inserting_after(node):
            item = split.graph.call_function(operator.getitem, (node, 0))
        node.replace_all_uses_with(item, delete_user_cb=lambda user, item=item: user is not item)
    split.recompile()
    return split


class _PieceCompiler(fx.Interpreter):
    """Runs the split graph on fake inputs; compiles each piece with the inputs it sees."""

    def __init__(self, split: fx.GraphModule, piece_names: list[str], compile_piece: Callable) -> None:
        super().__init__(split)
        self.piece_names = set(piece_names)
        self.compile_piece = compile_piece

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        if target in self.piece_names:
            self.compile_piece(target, self.module.get_submodule(target), args)
        return out


class PieceCompiler:
    """Compiles pieces with Inductor through the disk cache; identical pieces compile once."""

    def __init__(self, backend: str, cache: CompileCache | None, device_key: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"compile backend {backend!r} is unknown; use one of {BACKENDS}.")
        self.backend = backend
        self.cache = cache
        self.device_key = device_key
        self._by_key: dict[str, Callable] = {}

    def __call__(self, name: str, gm: fx.GraphModule, args: tuple) -> tuple[Callable, PieceStats]:
        num_ops = sum(1 for n in gm.graph.nodes if n.op.startswith("call"))
        if self.backend == "eager":
            return gm, PieceStats(name, num_ops, "eager", 0.0)
        start = time.perf_counter()
        key = graph_key(gm, args, extra=self.device_key)
        if key in self._by_key:
            return self._by_key[key], PieceStats(name, num_ops, "shared", 0.0)
        import torch._inductor  # loaded by Dynamo already; explicit for readers and tests

        source = "cache"
        artifact = self.cache.load(key) if self.cache is not None else None
        if artifact is None:
            source = "compiled"
            try:
                artifact = torch._inductor.standalone_compile(gm, list(args), dynamic_shapes="from_graph")
            except Exception as e:  # e.g. no C compiler: the piece still runs, only slower
                logger.warning("Inductor failed on %s (%s: %s); running it eagerly.", name, type(e).__name__, e)
                return gm, PieceStats(name, num_ops, "eager-fallback", time.perf_counter() - start)
            if self.cache is not None:
                self.cache.save(key, artifact)
        self._by_key[key] = artifact
        return artifact, PieceStats(name, num_ops, source, time.perf_counter() - start)


def _input_plan(gm: fx.GraphModule, example_inputs: list[Any], input_ids: torch.Tensor,
                positions: torch.Tensor) -> list[tuple[str, Any]]:
    """How to build each graph input at run time from (input_ids, positions)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    fake_ids = next(n.meta["example_value"] for n, v in zip(placeholders, example_inputs) if v is input_ids)
    length_expr = fake_ids.shape[0].node.expr if isinstance(fake_ids.shape[0], torch.SymInt) else None
    plan: list[tuple[str, Any]] = []
    for node, value in zip(placeholders, example_inputs):
        fake = node.meta.get("example_value")
        if value is input_ids:
            plan.append(("input_ids", None))
        elif value is positions:
            plan.append(("positions", None))
        elif isinstance(fake, torch.SymInt):
            if length_expr is None or fake.node.expr != length_expr:
                raise RuntimeError(f"The traced graph has a size input {node.name} ({fake}) that is not the "
                                   "number of tokens; the model's forward must depend only on its inputs' length.")
            plan.append(("num_tokens", None))
        else:
            plan.append(("const", value))
    if length_expr is None:
        raise RuntimeError("Dynamo specialized the traced graph on num_tokens; it would not serve other sizes.")
    return plan


def trace_and_split(model: nn.Module, device: torch.device, attn_layers: dict[int, Any],
                    compile_piece: PieceCompiler, wrap_piece: Callable[[int, Callable], Callable]) -> SplitModel:
    """Trace ``model(input_ids, positions)`` once, split at attention, compile and wrap each piece."""
    result: dict[str, Any] = {}
    input_ids = torch.zeros(TRACE_NUM_TOKENS, dtype=torch.long, device=device)
    positions = torch.arange(TRACE_NUM_TOKENS, dtype=torch.long, device=device)

    def backend(gm: fx.GraphModule, example_inputs: list[Any]):
        traced = time.perf_counter()
        split, piece_names, attention_names = split_at_attention(gm)
        stats: list[PieceStats] = []
        compiled: dict[str, Callable] = {}

        def on_piece(name: str, piece_gm: fx.GraphModule, args: tuple) -> None:
            fn, info = compile_piece(name, piece_gm, args)
            compiled[name] = fn
            stats.append(info)

        # Dynamo hands backends their own fake mode (sharing its shape environment).
        fake_mode = torch._guards.detect_fake_mode()
        fake_args = [fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in example_inputs]
        with fake_mode:
            _PieceCompiler(split, piece_names, on_piece).run(*fake_args)
        for i, name in enumerate(piece_names):
            # Shadows the submodule (kept in _modules for inspection) in the split graph's calls.
            split.__dict__[name] = wrap_piece(i, compiled[name])
        for name in attention_names:  # eager between the pieces: no dispatcher on the way
            bypass_dispatcher(split.get_submodule(name))
        result.update(split=SplitModel(split, piece_names, attention_names,
                                       _input_plan(gm, example_inputs, input_ids, positions), stats,
                                       compile_seconds=time.perf_counter() - traced),
                      traced=traced)
        return split

    def entry(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(ids, pos)

    torch._dynamo.mark_dynamic(input_ids, 0)
    torch._dynamo.mark_dynamic(positions, 0)
    start = time.perf_counter()
    trace_ctx = ForwardContext(attn_metadata=None, kv_caches=[], attn_impl=None, attn_layers=attn_layers)
    try:
        with torch.no_grad(), set_forward_context(trace_ctx):
            torch.compile(entry, backend=backend, fullgraph=True)(input_ids, positions)
    finally:
        # Each trace is a fresh entry; drop Dynamo's cache so many models never hit its limit.
        torch._dynamo.reset_code(entry.__code__)
    split_model: SplitModel = result["split"]
    split_model.trace_seconds = result["traced"] - start
    return split_model

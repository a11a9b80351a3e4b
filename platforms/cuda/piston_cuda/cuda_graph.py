"""CudaGraphStrategy: one CUDA graph per compiled piece and capture size, attention eager.

During warm-up (``capturing()``) a piece called at a capture size runs once, is captured
into a graph from a memory pool shared by every piece and size, and is replayed. Later
steps of that size replay the graph. A captured graph reads its inputs at the addresses
it saw at capture, so:
- the model inputs are copied into static buffers (one copy each per step);
- a piece's other inputs are weights (fixed), outputs of the previous piece's graph
  (fixed) or the attention output buffer, which that graph allocated (fixed);
- any input whose address still differs at replay is copied into the captured one.
Steps above the largest capture size run the compiled pieces without graphs.

Only torch.cuda APIs are used, and only when a graph is captured, so the module imports
on a CPU-only torch. ``GraphOps`` is the seam a test uses to check the replay logic there.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from piston.compilation.capture import CaptureStrategy, default_capture_sizes

logger = logging.getLogger(__name__.replace("piston_cuda", "piston.cuda", 1))


class GraphOps:
    """Capture and replay of CUDA graphs from one shared memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = None
        self._stream = None

    def begin(self) -> None:
        """Called once before a round of captures."""
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(self.device)

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """Record ``fn`` into a new graph (it does not run); returns (graph, fn's outputs)."""
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph() would also gc.collect() and empty the cache on every capture:
        # hundreds of captures make that the bulk of start-up, so streams are handled here.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            graph.capture_begin(pool=self._pool)
            try:
                outputs = fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return graph, outputs

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class _Captured:
    graph: Any
    args: tuple  # the inputs seen at capture (kept alive: the graph reads their memory)
    pointers: list[tuple[int, int]]  # (arg index, data_ptr) of each tensor input
    outputs: Any


class _GraphPiece:
    """Wraps one compiled piece: replays its graph for the step's size, if captured."""

    def __init__(self, strategy: "CudaGraphStrategy", index: int, piece: Callable) -> None:
        self.strategy = strategy
        self.index = index
        self.piece = piece
        self.captured: dict[int, _Captured] = {}

    def __call__(self, *args: Any) -> Any:
        size = self.strategy.num_tokens
        entry = self.captured.get(size)
        if entry is None:
            if self.strategy.is_capturing and size in self.strategy.capture_sizes:
                return self._capture(size, args)
            return self.piece(*args)
        for i, ptr in entry.pointers:
            if args[i].data_ptr() != ptr:
                entry.args[i].copy_(args[i])
        self.strategy.ops.replay(entry.graph)
        return entry.outputs

    def _capture(self, size: int, args: tuple) -> Any:
        ops = self.strategy.ops
        self.piece(*args)  # warm-up outside the graph: lazy initialisation, autotuning
        graph, outputs = ops.capture(lambda: self.piece(*args))
        pointers = [(i, a.data_ptr()) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.captured[size] = _Captured(graph, args, pointers, outputs)
        ops.replay(graph)  # capture only recorded the kernels: compute this call's outputs
        return outputs


class CudaGraphStrategy(CaptureStrategy):
    """Piecewise CUDA graphs for ``capture_sizes`` (in tokens); eager pieces above them."""

    name = "cuda_graph"

    def __init__(self, capture_sizes: Sequence[int], device: torch.device, ops: GraphOps | None = None) -> None:
        super().__init__(capture_sizes)
        self.device = device
        self.ops = ops if ops is not None else GraphOps(device)
        self.is_capturing = False
        self.pieces: list[_GraphPiece] = []
        self._static_ids: torch.Tensor | None = None
        self._static_positions: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: Any, device: torch.device) -> "CudaGraphStrategy":
        """The config's capture sizes, else 1, 2, 4, ... up to max_num_seqs."""
        sizes = config.compilation_config.capture_sizes or default_capture_sizes(
            config.scheduler_config.max_num_seqs)
        return cls(sizes, device)

    @property
    def captures_graphs(self) -> bool:
        return True

    @property
    def num_graphs(self) -> int:
        return sum(len(p.captured) for p in self.pieces)

    def drop_graphs(self) -> None:
        for piece in self.pieces:
            piece.captured.clear()  # the pool keeps its memory for the next captures

    def wrap_piece(self, index: int, piece: Callable) -> Callable:
        wrapped = _GraphPiece(self, index, piece)
        self.pieces.append(wrapped)
        return wrapped

    def pad_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        if padded not in self.capture_sizes:
            return super().pad_inputs(input_ids, positions, padded)
        if self._static_ids is None:
            largest = self.capture_sizes[-1]
            self._static_ids = torch.zeros(largest, dtype=torch.long, device=input_ids.device)
            self._static_positions = torch.zeros(largest, dtype=torch.long, device=positions.device)
        n = input_ids.shape[0]
        # Padded rows keep earlier ids and positions: valid values, and their outputs are dropped.
        self._static_ids[:n].copy_(input_ids)
        self._static_positions[:n].copy_(positions)
        return self._static_ids[:padded], self._static_positions[:padded]

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self.ops.begin()
        self.is_capturing = True
        try:
            yield
        finally:
            self.is_capturing = False

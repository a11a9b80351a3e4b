"""Tensor-parallel linear layers (Megatron-style), which are plain Linears on one rank.

- ``ColumnParallelLinear`` splits the output features: each rank computes its slice.
- ``MergedColumnParallelLinear`` fuses several column-parallel outputs (gate and up);
  each one is split separately, so a rank's slice holds its part of every output.
- ``QKVParallelLinear`` fuses q, k and v, split by whole KV groups (unevenly when they do
  not divide); KV heads are replicated when there are fewer of them than ranks.
- ``RowParallelLinear`` splits the input features and sums the partial results over the
  ranks (one all-reduce), so a column-parallel layer followed by a row-parallel one
  needs a single collective.

Each layer loads checkpoint tensors with ``load(param_name, tensor, shard_id)``: it reads
only this rank's slice, from a tensor or a lazy safetensors slice.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from piston.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from piston.models.weight_loader import narrow, shape_of
from piston.step.tp_layout import head_partition, split_range


def _copy(dst: torch.Tensor, src: Any, name: str) -> None:
    if tuple(dst.shape) != shape_of(src):
        raise ValueError(f"Checkpoint tensor for {name} has shape {shape_of(src)}, but this rank "
                         f"expects {tuple(dst.shape)}: the config does not match the weights.")
    dst.copy_(src if isinstance(src, torch.Tensor) else src[:])


class ParallelLinearBase(nn.Module):
    """Holds this rank's ``weight`` [out_local, in_local] and optional ``bias``.

    ``shard_ids``: the checkpoint tensors that together fill the parameters (None for a
    single one); the model's loader uses it to report what a checkpoint left out.
    """

    shard_ids: tuple[Any, ...] = (None,)
    # A platform may set a faster ``kernel(x, weight, bias) -> x @ weight.T + bias`` on a
    # loaded model's layers (same contract as F.linear); None runs F.linear.
    kernel: Callable[..., torch.Tensor] | None = None

    def __init__(self, in_local: int, out_local: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.weight = nn.Parameter(torch.empty(out_local, in_local))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernel = self.kernel
        return F.linear(x, self.weight, bias) if kernel is None else kernel(x, self.weight, bias)

    def extra_repr(self) -> str:
        in_f, out_f = self.weight.shape[1], self.weight.shape[0]
        return f"in={in_f}, out={out_f}, bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"


class ColumnParallelLinear(ParallelLinearBase):
    """Output rows ``start..start+count`` on this rank (an even split unless given)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 partition: tuple[int, int] | None = None) -> None:
        self.output_size = output_size
        self.out_start, out_local = partition or split_range(output_size, get_tp_size(), get_tp_rank())
        super().__init__(input_size, out_local, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def load(self, param_name: str, loaded: Any, shard_id: Any = None) -> None:
        param = getattr(self, param_name)
        _copy(param.data, narrow(loaded, 0, self.out_start, param.shape[0]), param_name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Outputs ``output_sizes[0] | output_sizes[1] | ...`` fused; shard ids 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        # Each output is split on its own: (start in the checkpoint tensor, rows here).
        self.parts = [split_range(size, tp, rank) for size in output_sizes]
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias,
                         partition=(0, sum(rows for _, rows in self.parts)))

    def load(self, param_name: str, loaded: Any, shard_id: Any = None) -> None:
        param = getattr(self, param_name)
        start, rows = self.parts[shard_id]
        offset = sum(r for _, r in self.parts[:shard_id])
        _copy(param.data.narrow(0, offset, rows), narrow(loaded, 0, start, rows), f"{param_name}[{shard_id}]")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v fused and split by heads; shard ids "q", "k", "v"."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        self.head_dim = head_dim
        self.heads = head_partition(num_heads, num_kv_heads, tp, rank)
        self.num_heads, self.num_kv_heads = self.heads.num_heads, self.heads.num_kv_heads
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        nn.Module.__init__(self)
        self.output_size = (num_heads + 2 * num_kv_heads) * head_dim
        self.tp_rank, self.tp_size = rank, tp
        out_local = self.q_size + 2 * self.kv_size
        self.weight = nn.Parameter(torch.empty(out_local, hidden_size))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None

    def load(self, param_name: str, loaded: Any, shard_id: Any = None) -> None:
        param = getattr(self, param_name)
        if shard_id == "q":
            dst_offset, rows, src_start = 0, self.q_size, self.heads.q_start * self.head_dim
        else:
            dst_offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            rows, src_start = self.kv_size, self.heads.kv_start * self.head_dim
        _copy(param.data.narrow(0, dst_offset, rows), narrow(loaded, 0, src_start, rows),
              f"{param_name}[{shard_id}]")


class RowParallelLinear(ParallelLinearBase):
    """Input features ``start..start+count`` on this rank; the output is summed over ranks.

    ``partition`` must match the column-parallel layer that feeds it (o_proj takes the
    q heads' columns of its rank).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 partition: tuple[int, int] | None = None) -> None:
        self.input_size = input_size
        self.in_start, in_local = partition or split_range(input_size, get_tp_size(), get_tp_rank())
        super().__init__(in_local, output_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        out = tp_all_reduce(self.matmul(x, None))
        return out if self.bias is None else out + self.bias

    def load(self, param_name: str, loaded: Any, shard_id: Any = None) -> None:
        param = getattr(self, param_name)
        if param_name == "bias":  # added once, after the sum
            _copy(param.data, loaded, param_name)
            return
        _copy(param.data, narrow(loaded, 1, self.in_start, param.shape[1]), param_name)

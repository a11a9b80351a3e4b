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
only this rank's slice, from a tensor or a lazy safetensors slice. A layer may instead
hold its weight packed (``use_packed_weight``: a GGUF file's quantized blocks, or int8
quantized at load; see piston.models.layers.quantized): it then has ``qweight`` and no
float ``weight``, and runs its ``qkernel`` slot.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from piston.checkpoint.packed import PackedArray
from piston.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from piston.models.layers.quantized import PackedWeight
from piston.models.weight_loader import materialize, narrow, shape_of
from piston.step.tp_layout import head_partition, split_range

logger = logging.getLogger(__name__)


def _copy(dst: torch.Tensor, src: Any, name: str) -> None:
    if tuple(dst.shape) != shape_of(src):
        raise ValueError(f"Checkpoint tensor for {name} has shape {shape_of(src)}, but this rank "
                         f"expects {tuple(dst.shape)}: the config does not match the weights.")
    dst.copy_(materialize(src))


class ParallelLinearBase(nn.Module):
    """Holds this rank's ``weight`` [out_local, in_local] and optional ``bias``.

    ``shard_ids``: the checkpoint tensors that together fill the parameters (None for a
    single one); the model's loader uses it to report what a checkpoint left out.
    Subclasses say where each shard goes: ``_weight_part`` (this rank's part of a
    checkpoint tensor) and ``_weight_rows`` (where it lands in the local weight).
    """

    shard_ids: tuple[Any, ...] = (None,)
    # A platform may set a faster ``kernel(x, weight, bias) -> x @ weight.T + bias`` on a
    # loaded model's layers (same contract as F.linear); None runs F.linear.
    kernel: Callable[..., torch.Tensor] | None = None
    # The same for a packed weight: ``qkernel(x, qweight, bias)``; None dequantizes it
    # with torch on every call (PackedWeight.linear).
    qkernel: Callable[..., torch.Tensor] | None = None

    def __init__(self, in_local: int, out_local: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_local, self.out_local = in_local, out_local
        self.weight = nn.Parameter(torch.empty(out_local, in_local))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None
        self.qweight: PackedWeight | None = None  # set by use_packed_weight
        self.lora = None  # a LoRAStack with --enable-lora (piston.models.layers.lora.attach_lora)

    def use_packed_weight(self, quantize: str | None = None) -> None:
        """Hold the weight packed (call on the model before its memory is allocated):
        ``qweight`` replaces the float ``weight``, filled at load from packed checkpoint
        tensors, or from float ones quantized with ``quantize`` ("int8") or kept as F32."""
        self.weight = None
        shards = [(shard_id, self._weight_rows(shard_id)[1]) for shard_id in self.shard_ids]
        self.qweight = PackedWeight(self.in_local, shards, quantize)

    def _weight_rows(self, shard_id: Any) -> tuple[int, int]:
        """(first row, rows) of shard ``shard_id`` in this rank's weight."""
        return 0, self.out_local

    def _weight_part(self, loaded: Any, shard_id: Any) -> Any:
        """This rank's part of checkpoint weight tensor ``loaded`` (shard ``shard_id``)."""
        raise NotImplementedError

    def load(self, param_name: str, loaded: Any, shard_id: Any = None) -> None:
        if param_name == "bias":
            start, rows = self._weight_rows(shard_id)
            _copy(self.bias.data.narrow(0, start, rows), self._bias_part(loaded, shard_id), f"bias[{shard_id}]")
            return
        part = self._weight_part(loaded, shard_id)
        if self.qweight is not None:
            if isinstance(loaded, PackedArray) and not isinstance(part, PackedArray):
                logger.info("A %s weight cut through its blocks on this rank: served as float32.", loaded.fmt)
            self.qweight.add(shard_id, part, f"weight[{shard_id}]")
            return
        start, rows = self._weight_rows(shard_id)
        _copy(self.weight.data.narrow(0, start, rows), part, f"weight[{shard_id}]")

    def _bias_part(self, loaded: Any, shard_id: Any) -> Any:
        return self._weight_part(loaded, shard_id)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.qweight is not None:
            qkernel = self.qkernel
            return self.qweight.linear(x, bias) if qkernel is None else qkernel(x, self.qweight, bias)
        kernel = self.kernel
        return F.linear(x, self.weight, bias) if kernel is None else kernel(x, self.weight, bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_local}, out={self.out_local}, bias={self.bias is not None}, "
                f"tp={self.tp_rank}/{self.tp_size}")


class ColumnParallelLinear(ParallelLinearBase):
    """Output rows ``start..start+count`` on this rank (an even split unless given)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 partition: tuple[int, int] | None = None) -> None:
        self.output_size = output_size
        self.out_start, out_local = partition or split_range(output_size, get_tp_size(), get_tp_rank())
        super().__init__(input_size, out_local, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        if self.lora is not None:
            self.lora.add_delta(x, y)
        return y

    def _weight_part(self, loaded: Any, shard_id: Any) -> Any:
        return narrow(loaded, 0, self.out_start, self.out_local)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Outputs ``output_sizes[0] | output_sizes[1] | ...`` fused; shard ids 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        # Each output is split on its own: (start in the checkpoint tensor, rows here).
        self.parts = [split_range(size, tp, rank) for size in output_sizes]
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias,
                         partition=(0, sum(rows for _, rows in self.parts)))

    def _weight_rows(self, shard_id: Any) -> tuple[int, int]:
        return sum(r for _, r in self.parts[:shard_id]), self.parts[shard_id][1]

    def _weight_part(self, loaded: Any, shard_id: Any) -> Any:
        start, rows = self.parts[shard_id]
        return narrow(loaded, 0, start, rows)


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
        self.output_size = (num_heads + 2 * num_kv_heads) * head_dim
        ParallelLinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias)

    def _weight_rows(self, shard_id: Any) -> tuple[int, int]:
        if shard_id == "q":
            return 0, self.q_size
        return self.q_size + (0 if shard_id == "k" else self.kv_size), self.kv_size

    def _weight_part(self, loaded: Any, shard_id: Any) -> Any:
        if shard_id == "q":
            return narrow(loaded, 0, self.heads.q_start * self.head_dim, self.q_size)
        return narrow(loaded, 0, self.heads.kv_start * self.head_dim, self.kv_size)


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
            y = self.matmul(x, self.bias)
            if self.lora is not None:
                self.lora.add_delta(x, y)
            return y
        y = self.matmul(x, None)
        if self.lora is not None:  # this rank's part of the delta: the all-reduce sums them
            self.lora.add_delta(x, y)
        out = tp_all_reduce(y)
        return out if self.bias is None else out + self.bias

    def _weight_part(self, loaded: Any, shard_id: Any) -> Any:
        return narrow(loaded, 1, self.in_start, self.in_local)

    def _bias_part(self, loaded: Any, shard_id: Any) -> Any:
        return loaded  # added once, after the sum

"""Batched multi-LoRA for the torch models: adapter slots stacked in each linear layer.

``attach_lora(model, max_loras, max_rank)`` gives every q/k/v, o, gate/up and down
projection a ``LoRAStack`` (``layer.lora``). A stack holds ``max_loras`` slots of this
rank's matrices, padded to ``max_rank`` per fused slice:

- ``lora_a`` [slots, in_local, slices * max_rank]: slice j's A^T in columns j*R..j*R+r;
- ``lora_b`` [slots, slices * max_rank, out_local]: slice j's B^T (scaling applied) in rows
  j*R.., in the columns of that slice's output (q, k or v; gate or up), zeros elsewhere.

Each step the runner sets a ``LoRAMapping`` (``set_lora_mapping``): the step's tokens
that use an adapter, grouped by slot. A layer then adds, for those tokens only,
``(x @ A[slot]) @ B[slot]`` to its output: two grouped GEMMs (shrink to the rank, expand
back) with no loop over adapters or rows (Punica/S-LoRA's SGMV). A platform may set a
faster ``LoRAStack.kernel(stack, x, y, mapping)`` (the CPU: a C++ SGMV kernel; CUDA:
Triton); None runs torch's grouped GEMM. The rank is padded to a multiple of 8 (zeros),
and ``slice_bounds`` [slices + 1] holds each slice's output columns, so a kernel may skip
the zero blocks of B between slices.

Tensor parallelism: a column-parallel layer keeps A whole and its rows of B (the output
is split); a row-parallel layer keeps its columns of A (the input is split) and B whole,
and adds its partial delta before the all-reduce, which sums the ranks' parts into
``B @ (A @ x)`` because the expand is linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from piston.models.layers.linear import ParallelLinearBase, RowParallelLinear
from piston.step.lora_adapter import LORA_MODULES, LoRAAdapter, module_name


@dataclass
class LoRAMapping:
    """One step's tokens that use an adapter: ``token_ids`` [n] (indices into the step's
    tokens, grouped by slot), ``slot_ends`` int32 [slots] (cumulative ends of the groups),
    the largest group, and ``single_slot`` when every token of the step uses that one slot
    (no gather needed)."""

    token_ids: torch.Tensor
    slot_ends: torch.Tensor
    max_tokens_per_slot: int
    single_slot: int | None


_mapping: LoRAMapping | None = None


def set_lora_mapping(mapping: LoRAMapping | None) -> None:
    """The mapping the next forward pass's LoRA layers read (None: no adapter this step)."""
    global _mapping
    _mapping = mapping


def build_lora_mapping(token_slots: np.ndarray, num_slots: int, device: torch.device) -> LoRAMapping | None:
    """The LoRAMapping of a step whose tokens use slots ``token_slots`` (-1: none)."""
    token_slots = np.asarray(token_slots)
    used = np.flatnonzero(token_slots >= 0)
    if len(used) == 0:
        return None
    slots = token_slots[used]
    counts = np.bincount(slots, minlength=num_slots)
    single = int(slots[0]) if len(used) == len(token_slots) and counts[slots[0]] == len(used) else None
    order = used[np.argsort(slots, kind="stable")]
    token_ids = torch.from_numpy(order.astype(np.int64)).to(device)
    slot_ends = torch.from_numpy(np.cumsum(counts).astype(np.int32)).to(device)
    return LoRAMapping(token_ids, slot_ends, int(counts.max()), single)


class LoRAStack(nn.Module):
    """The LoRA slots of one (possibly fused) linear layer; see the module docstring."""

    kernel: Callable[["LoRAStack", torch.Tensor, torch.Tensor, LoRAMapping], None] | None = None

    def __init__(self, layer: ParallelLinearBase, slices: list[tuple[str, Any]], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.slices = slices  # (hf module name, the layer's shard id), in output order
        self.max_rank = -(-max_rank // 8) * 8  # padded: SIMD kernels take whole 8-float vectors
        self.row_parallel = isinstance(layer, RowParallelLinear)
        width = len(slices) * self.max_rank
        if self.row_parallel or len(slices) == 1:
            bounds = [0, layer.out_local]
        else:
            bounds = [layer._weight_rows(shard_id)[0] for _, shard_id in slices] + [layer.out_local]
        self.slice_bounds = torch.tensor(bounds, dtype=torch.int64)  # host: not weights (sleep keeps it)
        self.register_buffer("lora_a", torch.zeros(max_loras, layer.in_local, width, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, width, layer.out_local, dtype=dtype, device=device),
                             persistent=False)

    @torch.no_grad()
    def write(self, layer: ParallelLinearBase, slot: int, layer_idx: int, adapter: LoRAAdapter | None) -> None:
        """Copy ``adapter``'s matrices for this layer into ``slot`` (this rank's shards)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if adapter is None:
            return
        r_max = self.max_rank
        for j, (module, shard_id) in enumerate(self.slices):
            pair = adapter.weights.get((layer_idx, module))
            if pair is None:
                continue
            a, b = (torch.from_numpy(m) for m in pair)  # [r, in], [out, r]
            r = a.shape[0]
            if self.row_parallel:
                a = layer._weight_part(a, shard_id)  # this rank's input columns
                start, rows = 0, layer.out_local
            else:
                b = layer._weight_part(b, shard_id)  # this rank's output rows of the slice
                start, rows = layer._weight_rows(shard_id)
            self.lora_a[slot, :, j * r_max:j * r_max + r].copy_(a.T)
            self.lora_b[slot, j * r_max:j * r_max + r, start:start + rows].copy_(b.T)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[t] += x[t] @ A[slot] @ B[slot]`` for the step's tokens that use an adapter."""
        m = _mapping
        if m is None:
            return
        if self.kernel is not None:
            self.kernel(self, x, y, m)
        else:
            self.torch_delta(x, y, m)

    def torch_delta(self, x: torch.Tensor, y: torch.Tensor, m: LoRAMapping) -> None:
        """``add_delta`` with torch's ops (the fallback of a platform kernel)."""
        if m.single_slot is not None:
            n = m.token_ids.shape[0]  # rows past the step's tokens (padding) get nothing
            y[:n] += (x[:n] @ self.lora_a[m.single_slot]) @ self.lora_b[m.single_slot]
        else:
            xs = x.index_select(0, m.token_ids)
            y.index_add_(0, m.token_ids, _grouped(_grouped(xs, self.lora_a, m.slot_ends), self.lora_b, m.slot_ends))

    def extra_repr(self) -> str:
        return (f"slots={self.lora_a.shape[0]}, max_rank={self.max_rank}, "
                f"slices={[m for m, _ in self.slices]}")


def _grouped(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``ends[s-1]:ends[s]`` of x times ``w[s]``: torch's grouped GEMM where it runs
    (CPU; CUDA for bfloat16 on recent GPUs), else one GEMM per slot."""
    try:
        return torch._grouped_mm(x, w, offs=ends)
    except (RuntimeError, NotImplementedError, AttributeError):
        out = x.new_empty(x.shape[0], w.shape[-1])
        start = 0
        for slot, end in enumerate(ends.tolist()):
            if end > start:
                torch.mm(x[start:end], w[slot], out=out[start:end])
            start = end
        return out


def attach_lora(model: nn.Module, max_loras: int, max_rank: int) -> dict[str, tuple[int, ParallelLinearBase]]:
    """Give the model's q/k/v, o, gate/up and down projections LoRA slots (zeros); returns
    {module name: (decoder layer index, layer)} for ``write_lora_slot``."""
    modules = dict(model.named_modules())
    grouped: dict[str, tuple[int, list[tuple[str, Any]]]] = {}
    for i in range(len(model.model.layers)):
        for module in LORA_MODULES:
            target, shard_id = model._target(f"{module_name(i, module)}.weight")
            name = target.rpartition(".")[0]
            grouped.setdefault(name, (i, []))[1].append((module, shard_id))
    layers = {}
    for name, (i, slices) in grouped.items():
        layer = modules[name]
        ref = layer.weight if layer.weight is not None else layer.bias
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else layer.qweight.device_marker.device
        if layer.qweight is not None:
            dtype = layer.qweight.dtype
        layer.lora = LoRAStack(layer, slices, max_loras, max_rank, dtype, device)
        layers[name] = (i, layer)
    return layers


def write_lora_slot(layers: dict[str, tuple[int, ParallelLinearBase]], slot: int, adapter: LoRAAdapter | None) -> None:
    for layer_idx, layer in layers.values():
        layer.lora.write(layer, slot, layer_idx, adapter)

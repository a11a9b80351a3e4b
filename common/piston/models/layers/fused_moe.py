"""Mixture-of-experts: top-k routing and the routed experts as two grouped GEMMs.

``FusedMoE`` holds a layer's experts stacked: ``w13.weight`` [E, 2 * I_local, H] (each
expert's gate rows, then its up rows) and ``w2.weight`` [E, H, I_local]. A step's
(token, expert) pairs are sorted by expert, so each expert's rows are one contiguous
group; the gate/up GEMM and the down GEMM then run over all groups at once (a grouped
GEMM), and the routing weights combine each token's k results. Nothing loops over tokens
or experts in Python.

A platform may set a faster ``FusedMoE.kernel`` (CUDA: a Triton grouped GEMM; the CPU: a
C++ grouped GEMM for small groups); None runs ``fused_experts`` with torch's grouped GEMM.

Tensor parallelism splits every expert's intermediate dimension over the ranks (gate and
up rows, down columns, as MergedColumnParallelLinear and RowParallelLinear split a dense
MLP). ``FusedMoE`` returns this rank's partial sum; the MoE block that owns it adds
any other partial outputs (a shared expert) and does the one all-reduce.

Checkpoints name the experts either one by one (``experts.{e}.gate_proj.weight`` or
Mixtral's ``w1``/``w3``/``w2``) or fused as transformers 5 holds them in memory
(``experts.gate_up_proj`` [E, 2 * I, H], ``experts.down_proj`` [E, H, I]); ``ExpertWeight``
loads either form, reading only this rank's slice.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from piston.distributed.parallel_state import get_tp_rank, get_tp_size
from piston.models.weight_loader import materialize, narrow, shape_of
from piston.step.tp_layout import split_range

FUSED = "fused"  # the shard id of transformers' fused [E, ...] expert tensors

# kernel(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights float32 [T, k], topk_ids int64 [T, k]) -> [T, H]
MoEKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# grouped_mm(x [M, K] grouped by expert, w [E, N, K], ends int32 [E]) -> [M, N]: rows ends[e-1]:ends[e] times w[e].T
GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (in float32), the top ``top_k`` per token, rescaled to sum
    to 1 with ``renormalize``: (weights float32 [T, k], expert ids int64 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@functools.lru_cache(maxsize=None)
def _torch_grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm takes this device and dtype (CPU: all float dtypes;
    CUDA: bfloat16 on recent GPUs)."""
    try:
        x = torch.ones(4, 8, dtype=dtype, device=device_type)
        w = torch.ones(2, 8, 8, dtype=dtype, device=device_type)
        torch._grouped_mm(x, w, offs=torch.tensor([1, 4], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x[ends[e-1]:ends[e]] @ w[e].T`` for every expert e, as one [M, N] matrix: torch's
    grouped GEMM where it runs (rows of x and w in multiples of 16 bytes), else one
    batched GEMM over the groups padded to the largest (a host read of the group sizes)."""
    aligned = x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0 and w.is_contiguous() \
        and (w.shape[2] * w.element_size()) % 16 == 0
    if aligned and _torch_grouped_mm_runs(x.device.type, x.dtype):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    longest = int(counts.max())
    slot = torch.arange(longest, device=x.device)
    rows = (ends - counts)[:, None] + slot[None, :]  # [E, longest]
    valid = slot[None, :] < counts[:, None]
    padded = x[rows.clamp(max=max(x.shape[0] - 1, 0))] * valid[..., None].to(x.dtype)
    return torch.bmm(padded, w.transpose(1, 2))[valid]  # group-major, as the rows of x


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, mm: GroupedMM = grouped_mm,
                  act_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`` with
    ``e = topk_ids[t, j]``, for every token t: [T, H] in x's dtype (weights applied and
    the k results summed in float32). A platform may pass its own grouped GEMM ``mm`` and
    ``act_and_mul``."""
    num_tokens, k = topk_ids.shape
    if num_tokens == 0:
        return x.new_zeros(0, w2.shape[1])
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # the (token, j) pairs, grouped by expert
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    ends = counts.cumsum(0, dtype=torch.int32)
    h = mm(x.index_select(0, order // k), w13, ends)
    y = mm(act_and_mul(h), w2, ends).float() * topk_weights.reshape(-1)[order, None].float()
    combined = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, j) order
    return combined.view(num_tokens, k, -1).sum(dim=1).to(x.dtype)


@torch.library.custom_op("piston::fused_experts", mutates_args=())
def fused_experts_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
    """``fused_experts`` as an opaque op: torch.compile traces neither the grouping by expert
    (sizes that depend on the routing) nor torch's grouped GEMM (whose compile-time shape
    function takes bfloat16 only)."""
    return fused_experts(x, w13, w2, topk_weights, topk_ids)


@fused_experts_op.register_fake
def _(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
      topk_ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w2.shape[1])


class ExpertWeight(nn.Module):
    """One stacked weight of this rank's experts, filled per expert or from a fused tensor.

    ``gate_up``: ``weight`` [E, 2 * I_local, H], this rank's gate rows then its up rows of
    every expert; shard ids ``(e, 0)`` (gate) and ``(e, 1)`` (up) for the per-expert
    tensors [I, H]. Otherwise the down projection: ``weight`` [E, H, I_local], shard id
    ``e`` for the per-expert tensors [H, I]. Shard id ``FUSED`` takes transformers' fused
    tensor ([E, 2 * I, H] or [E, H, I]) at once.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gate_up: bool,
                 name: str) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up, self.name = gate_up, name
        self.inter_start, self.inter_local = split_range(intermediate_size, get_tp_size(), get_tp_rank())
        shape = (num_experts, 2 * self.inter_local, hidden_size) if gate_up else \
            (num_experts, hidden_size, self.inter_local)
        self.weight = nn.Parameter(torch.empty(shape))
        self.loaded_fused = False

    @property
    def shard_ids(self) -> tuple[Any, ...]:
        """The checkpoint tensors that fill the weight: the fused one once it came, else
        every expert's (the model's loader names the weight when one is missing)."""
        if self.loaded_fused:
            return (FUSED,)
        if self.gate_up:
            return tuple((e, half) for e in range(self.num_experts) for half in (0, 1))
        return tuple(range(self.num_experts))

    def load(self, param_name: str, loaded: Any, shard_id: Any) -> None:
        E, H, inter = self.num_experts, self.hidden_size, self.intermediate_size
        start, rows = self.inter_start, self.inter_local
        dst = self.weight.data
        if shard_id == FUSED:
            self._check(loaded, (E, 2 * inter, H) if self.gate_up else (E, H, inter), "the fused tensor")
            if self.gate_up:
                dst[:, :rows].copy_(materialize(narrow(loaded, 1, start, rows)))
                dst[:, rows:].copy_(materialize(narrow(loaded, 1, inter + start, rows)))
            else:
                dst.copy_(materialize(narrow(loaded, 2, start, rows)))
            self.loaded_fused = True
            return
        expert, half = shard_id if self.gate_up else (shard_id, 0)
        what = f"expert {expert}'s {('gate', 'up')[half] if self.gate_up else 'down'} projection"
        if not 0 <= expert < E:
            raise ValueError(f"{self.name}: the checkpoint has {what}, but the config has {E} experts "
                             "(num_experts / num_local_experts): the config does not match the weights.")
        self._check(loaded, (inter, H) if self.gate_up else (H, inter), what)
        if self.gate_up:
            dst[expert, half * rows:(half + 1) * rows].copy_(materialize(narrow(loaded, 0, start, rows)))
        else:
            dst[expert].copy_(materialize(narrow(loaded, 1, start, rows)))

    def _check(self, loaded: Any, expected: tuple[int, ...], what: str) -> None:
        if shape_of(loaded) != expected:
            raise ValueError(f"{self.name}: the checkpoint's {what} has shape {shape_of(loaded)}, but the model "
                             f"expects {expected}: the config does not match the weights.")

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, shape={tuple(self.weight.shape)}"


class FusedMoE(nn.Module):
    """The routed experts of one MoE layer (see the module docstring).

    ``forward(x [T, H], router_logits [T, E]) -> [T, H]``: this rank's part of the experts'
    weighted sum (the caller all-reduces it over the ranks).
    """

    kernel: MoEKernel | None = None

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, hidden_act: str = "silu", name: str = "experts") -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"{name}: hidden_act={hidden_act!r} is not supported for the experts of a "
                             "mixture-of-experts layer; supported: silu.")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{name}: num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}.")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.w13 = ExpertWeight(num_experts, hidden_size, intermediate_size, True, f"{name}.w13")
        self.w2 = ExpertWeight(num_experts, hidden_size, intermediate_size, False, f"{name}.w2")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        kernel = self.kernel
        if kernel is not None:
            return kernel(x, self.w13.weight, self.w2.weight, topk_weights, topk_ids)
        return fused_experts_op(x, self.w13.weight, self.w2.weight, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"

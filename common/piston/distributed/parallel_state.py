"""The tensor-parallel group of this process, and the collectives the models use.

Every rank is its own process running the same code. The executor initializes
torch.distributed (with the platform's backend: gloo on the CPU, NCCL on CUDA) before it
creates the worker; until then, and with one rank, every collective is a no-op, so the
models run unchanged in a single process (and in unit tests).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallelState:
    rank: int = 0
    world_size: int = 1


_STATE = TensorParallelState()


def init_distributed(backend: str, rank: int, world_size: int, init_method: str,
                     timeout_s: float = 600.0) -> None:
    """Join the tensor-parallel group (all ``world_size`` ranks must call this)."""
    global _STATE
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method=init_method, rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("Rank %d of %d joined the tensor-parallel group (%s, %s).", rank, world_size,
                    backend, init_method)
    _STATE = TensorParallelState(rank, world_size)


def get_tp_rank() -> int:
    return _STATE.rank


def get_tp_size() -> int:
    return _STATE.world_size


@torch.library.custom_op("piston::tp_all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out)
    return out


@_all_reduce_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks; returns the sum (``x`` itself with one rank).

    An opaque custom op, so torch.compile keeps it whole inside a compiled piece and a CUDA
    graph captures the collective as it is.
    """
    if _STATE.world_size > 1:
        return _all_reduce_op(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order."""
    if _STATE.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x)  # the list form: gloo and NCCL both implement it
    return torch.cat(parts, dim=dim)


def split_range(n: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``(start, count)`` of this rank's share of ``n`` items split as evenly as possible
    (the first ``n % tp_size`` ranks get one more)."""
    base, extra = divmod(n, tp_size)
    return tp_rank * base + min(tp_rank, extra), base + (tp_rank < extra)


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads one rank computes: q heads ``q_start..q_start+num_heads`` and
    the KV heads ``kv_start..kv_start+num_kv_heads`` they read."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def head_partition(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadPartition:
    """Split attention over the ranks by whole KV groups, unevenly when they do not divide
    (SmolLM2's 3 KV heads over 2 ranks: 2 and 1). With fewer KV heads than ranks, each KV
    head is replicated on ``tp_size // num_kv_heads`` ranks that share its group's q heads.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                         f"num_key_value_heads={num_kv_heads}.")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        kv_start, kv_count = split_range(num_kv_heads, tp_size, tp_rank)
        return HeadPartition(kv_start * group, kv_count * group, kv_start, kv_count)
    if tp_size % num_kv_heads:
        raise ValueError(f"num_key_value_heads={num_kv_heads} cannot be shared by "
                         f"tensor_parallel_size={tp_size} ranks: with fewer KV heads than ranks, "
                         "the number of ranks must be a multiple of the number of KV heads.")
    ranks_per_kv = tp_size // num_kv_heads
    if group < ranks_per_kv:
        raise ValueError(f"tensor_parallel_size={tp_size} exceeds num_attention_heads={num_heads}: "
                         "some rank would have no attention head.")
    kv = tp_rank // ranks_per_kv
    q_off, q_count = split_range(group, ranks_per_kv, tp_rank % ranks_per_kv)
    return HeadPartition(kv * group + q_off, q_count, kv, 1)


def num_kv_head_copies(num_kv_heads: int, tp_size: int) -> int:
    """KV heads held over all ranks together (more than num_kv_heads when replicated)."""
    return max(num_kv_heads, tp_size)

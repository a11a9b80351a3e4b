"""The tensor-parallel group of this process, and the collectives the models use.

Every rank is its own process running the same code. The executor initializes
torch.distributed (with the platform's backend: gloo on the CPU, NCCL on CUDA) before it
creates the worker; until then, and with one rank, every collective is a no-op, so the
models run unchanged in a single process (and in unit tests). How the model is split
(ranges, attention heads) is plain arithmetic in piston.step.tp_layout.
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

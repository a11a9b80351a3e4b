"""How tensor parallelism splits a model over ranks: even ranges and attention heads.

Plain arithmetic, shared by the torch layers (piston.distributed), the workers sizing
their KV caches and ModelConfig; the collectives themselves live in piston.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass


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

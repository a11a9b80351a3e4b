"""HybridKVCacheManager: one block table per KV cache group, over one shared block pool.

vLLM's hybrid allocator, for models that mix full-attention and sliding-window layers
(Gemma 3). piston.step.kv_cache_layout cuts the layers into groups of equal size, so one
block of the shared pool is the same memory in any group. Each group has its own
KVCacheManager (its block lists, its released places, its registered blocks) on the shared
BlockPool: a full group keeps every block of a request, a sliding group frees those behind
its window at each step's start (``release_out_of_window``), as a one-group sliding model's
manager does. A request has as many block places in every group (one per ``block_size``
tokens); a freed place is RELEASED.

Prefix caching: each group keys its blocks by the request's block hashes salted with the
group's number (``hash | g << 128``; the hashes are 128 bits), so groups never hit each
other's blocks. A hit must hold in every group at the same length: the full groups need
every block from the start, the sliding groups only the blocks their window reaches back
over from the hit's end (vLLM's lookup). The length starts at the longest possible and
shrinks until every group agrees.

The scheduler sees the same interface as KVCacheManager's; block ids come as one list per
group. Not supported here (kv_cache_layout keeps one group instead): the KV offload tier
and draft-model lookahead. Cascade attention is off (no prefix shared over every group).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from piston.core.block_hash import update_request_block_hashes
from piston.core.block_pool import BlockPool, KVCacheBlock
from piston.core.kv_cache_manager import RELEASED, KVCacheManager
from piston.core.kv_offload import KVOffloadIndex
from piston.step.kv_cache_layout import kv_cache_layout
from piston.step.kv_transfer import tier_directory

if TYPE_CHECKING:
    from piston.core.request import Request
    from piston.step.config import EngineConfig
    from piston.step.kv_cache_layout import KVCacheLayout

_SALT_SHIFT = 128  # block hashes are 128-bit (piston.core.block_hash)


def make_kv_cache_manager(config: "EngineConfig") -> "KVCacheManager | HybridKVCacheManager":
    """The scheduler's KV cache manager for ``config``'s layout (piston.step.kv_cache_layout):
    one block table (freeing blocks behind the window when every layer slides, with the
    offload tier when configured), or one per group of layers."""
    cache = config.cache_config
    layout = kv_cache_layout(config)
    if layout.hybrid:
        return HybridKVCacheManager(cache.num_blocks, cache.block_size, layout, cache.enable_prefix_caching)
    offload = None
    if cache.kv_offloading:
        offload = KVOffloadIndex(cache.kv_offload_host_blocks, cache.kv_offload_disk_blocks,
                                 tier_directory(config), config.parallel_config.tensor_parallel_size)
    return KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching, offload,
                          layout.groups[0].sliding_window)


class HybridKVCacheManager:
    """Allocates, shares and frees KV blocks per group of layers."""

    offload = None  # the offload tier is not supported with several groups

    def __init__(self, num_blocks: int, block_size: int, layout: "KVCacheLayout",
                 enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.layout = layout
        self.groups = [
            KVCacheManager(num_blocks, block_size, enable_caching, sliding_window=g.sliding_window,
                           block_pool=self.block_pool, hash_salt=i << _SALT_SHIFT)
            for i, g in enumerate(layout.groups)
        ]
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def sliding_window(self) -> int | None:
        """None: some group keeps the whole context (for the scheduler's reports)."""
        return None

    def begin_step(self) -> None:
        for g in self.groups:
            g.begin_step()

    def uncache_step(self) -> None:
        for g in self.groups:
            g.uncache_step()

    def get_computed_blocks(self, request: "Request") -> tuple[list[list[KVCacheBlock]], int]:
        """The longest prefix cached in every group, as each group's blocks, and its length in
        tokens; ([], 0) per group when there is none (see KVCacheManager.get_computed_blocks)."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [[] for _ in self.groups], 0
        update_request_block_hashes(request, self.block_size, request.block_hash_extra_keys)
        n = (request.num_tokens - 1) // self.block_size
        hits: list[list[KVCacheBlock]] = [[] for _ in self.groups]
        settled = False
        while not settled and n > 0:
            settled = True
            for i, g in enumerate(self.groups):
                hit = g.hit_blocks(g.hashes(request), n)
                hits[i] = hit
                if len(hit) < n:  # a shorter hit here: every group must look again at its length
                    n, settled = len(hit), False
                    break
        if n == 0:
            hits = [[] for _ in self.groups]
        num_hit_tokens = n * self.block_size
        self.prefix_queries += request.num_tokens
        self.prefix_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self,
        request: "Request",
        num_new_tokens: int,
        new_computed_blocks: Sequence[Sequence[KVCacheBlock]] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[list[int]] | None:
        """KVCacheManager.allocate_slots in every group, all or none: None (nothing changes)
        when the pool cannot give every group its fresh blocks."""
        computed = new_computed_blocks or [()] * len(self.groups)
        num_total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_required = -(-num_total // self.block_size)
        need = evictable_hits = 0
        for g, hit in zip(self.groups, computed):
            need += max(0, num_required - len(g.req_to_blocks.get(request.request_id, ())) - len(hit))
            evictable_hits += sum(1 for b in hit if b.ref_cnt == 0)
        if need > self.block_pool.get_num_free_blocks() - evictable_hits:
            return None
        # Reference every group's hit before any group takes fresh blocks: an evictable hit of
        # one group sits in the free list, where another group's allocation would take it.
        for hit in computed:
            self.block_pool.touch([b for b in hit if b is not RELEASED])
        out = []
        for g, hit in zip(self.groups, computed):
            ids = g.allocate_slots(request, num_new_tokens, hit, num_new_computed_tokens, hits_referenced=True)
            assert ids is not None, "a group's allocation failed after the pool check"
            out.append(ids[0])
        return out

    def allocate_lookahead(self, request: "Request", num_tokens: int, keep_free: int) -> list[int]:
        return []  # draft models keep one group (piston.step.kv_cache_layout)

    def release_out_of_window(self, requests: Iterable["Request"]) -> int:
        """Each sliding group frees the blocks behind its window; returns how many in all."""
        requests = list(requests)
        return sum(g.release_out_of_window(requests) for g in self.groups)

    def num_new_blocks(self, request: "Request", num_new_tokens: int) -> int:
        return sum(g.num_new_blocks(request, num_new_tokens) for g in self.groups)

    def free(self, request: "Request") -> None:
        for g in self.groups:
            g.free(request)

    def get_block_ids(self, request_id: str) -> list[list[int]]:
        return [g.get_block_ids(request_id)[0] for g in self.groups]

    def get_num_common_prefix_blocks(self, running_request: "Request", num_running_requests: int) -> int:
        return 0  # no cascade attention over several block tables

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def reset_prefix_cache(self, keep_offloaded: bool = False) -> None:
        self.block_pool.reset_prefix_cache()
        self.prefix_queries = self.prefix_hits = 0

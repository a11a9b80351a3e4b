"""KVCacheManager: which blocks each request holds, and prefix-cache lookups.

The scheduler talks only to this class. It owns a BlockPool and a dict
``request_id -> list[KVCacheBlock]`` in sequence order (block i holds tokens
``[i * block_size, (i + 1) * block_size)``).

A block is registered in the prefix cache as soon as a step that fills it is
scheduled, before its KV is written. This is safe because a hit from a request
scheduled in the same step is computed in the same forward pass, where each layer
writes the KV of every token before any attention reads it.

Sliding windows: when every layer of the model attends to at most ``sliding_window``
positions back (Mistral, Mixtral; piston.step.layer_types.kv_lookback), the blocks of a
running request that fall wholly behind the window of its next query are freed at the
start of each step (``release_out_of_window``): a request then holds about
``sliding_window / block_size + 1`` blocks however long it grows. Each keeps its place in
the request's list as ``RELEASED``. The workers are not told: every attention backend
skips the blocks before a query's window without reading them (or masks what it gathers),
so a freed block's new owner may overwrite it. Freed blocks keep their hash and stay
prefix-cache hits until evicted, like a finished request's; a prefix hit needs only the
blocks the window reaches back over from its end (``_window_hit``), not every block from
the start.

One manager serves one group of layers (piston.step.kv_cache_layout). A model mixing full
and sliding-window layers (Gemma 3) gets one per group, sharing one BlockPool, under the
HybridKVCacheManager (piston.core.hybrid_kv_cache_manager); ``hash_salt`` then keeps each
group's prefix-cache keys apart. Block ids go to the scheduler one list per group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from piston.core.block_hash import update_request_block_hashes
from piston.core.block_pool import BlockPool, KVCacheBlock
from piston.core.kv_offload import KVOffloadIndex

if TYPE_CHECKING:
    from piston.core.request import Request

# The place of a block freed for falling behind the sliding window, or of a block a window
# hit does not need (ref_cnt -1: never shared, never freed again). A new request's list sent
# to the workers may hold its id (0) after a window hit: a block no query reads.
RELEASED = KVCacheBlock(0)
RELEASED.ref_cnt = -1


class KVCacheManager:
    """Allocates, shares and frees KV blocks for requests."""

    num_groups = 1

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 offload: KVOffloadIndex | None = None, sliding_window: int | None = None,
                 block_pool: BlockPool | None = None, hash_salt: int = 0) -> None:
        self.block_size = block_size
        # Every layer's look-back in tokens (None: some layer reads the whole context).
        self.sliding_window = sliding_window
        # Per request: how many leading blocks were released (RELEASED in its list).
        self.num_released: dict[str, int] = {}
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # A hybrid model's group managers share one pool (block_pool given), and each but the
        # first keys its blocks by hash | hash_salt, so two groups never hit each other's.
        self.block_pool = block_pool if block_pool is not None else BlockPool(num_blocks, enable_caching)
        self.hash_salt = hash_salt
        self._salted_hashes: dict[str, list[int]] = {}
        # The second tier (None: off): evicted cached blocks are saved there, and prefix
        # hits continue into it. ``offload_hits``: per request, the keys its last lookup
        # found there, loaded into its fresh blocks by allocate_slots.
        self.offload = offload if enable_caching else None
        self.offload_hits: dict[str, list[str]] = {}
        self.step_registered_ids: set[int] = set()
        if self.offload is not None:
            self.block_pool.on_evict = self._on_evict
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Per request: how many leading blocks are already registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # Prefix-cache statistics, in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0
        # Blocks registered in the prefix cache since begin_step: the step that fills them
        # has not run yet, so a failed step must take their hashes back (uncache_step).
        self.step_registered: list[KVCacheBlock] = []

    def begin_step(self) -> None:
        """A new step is being scheduled."""
        if self.offload is not None:
            self.persist_step()
            self.offload.pinned.clear()
            self.offload_hits.clear()
        self.step_registered.clear()
        self.step_registered_ids.clear()

    def persist_step(self) -> None:
        """The last step ran: the blocks it registered hold their KV now; write them to the
        offload tier's disk (when it has one), those that still hold their hash."""
        for block in self.step_registered:
            if block.block_hash is not None:
                self.offload.persist(block.block_id, block.block_hash)
        self.step_registered.clear()
        self.step_registered_ids.clear()

    def _on_evict(self, block: KVCacheBlock) -> None:
        """A cached block is being handed out again: save its KV to the offload tier, unless
        this step registered it (its KV is not written yet)."""
        if block.block_id not in self.step_registered_ids:
            self.offload.save(block.block_id, block.block_hash)

    def uncache_step(self) -> None:
        """The step failed: blocks it registered hold no KV, so no request may hit them."""
        self.block_pool.uncache(self.step_registered)
        self.step_registered.clear()

    def get_computed_blocks(self, request: "Request") -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of ``request`` in full blocks, and its length in tokens.

        At least one token is always left to compute, since its logits are needed: when
        the whole sequence is cached the last block is not counted. No hit when caching is
        off or the request wants prompt logprobs (they need the prompt's logits).
        The returned blocks are not referenced yet; ``allocate_slots`` takes them.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        update_request_block_hashes(request, self.block_size, request.block_hash_extra_keys)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self.hashes(request)
        hit_blocks = self.hit_blocks(hashes, max_hit_blocks)
        num_hit_tokens = len(hit_blocks) * self.block_size
        if self.offload is not None:
            self.offload.unpin(self.offload_hits.pop(request.request_id, ()))
            keys = self.offload.lookup(hashes[len(hit_blocks):max_hit_blocks])
            if keys:
                self.offload_hits[request.request_id] = keys
                num_hit_tokens += len(keys) * self.block_size
        self.prefix_queries += request.num_tokens
        self.prefix_hits += num_hit_tokens
        return hit_blocks, num_hit_tokens

    def hashes(self, request: "Request") -> Sequence[int]:
        """The request's block hashes as this manager's prefix-cache keys (``update_request_block_hashes``
        must be current): themselves, or salted for a hybrid model's later groups."""
        if not self.hash_salt:
            return request.block_hashes
        salted = self._salted_hashes.setdefault(request.request_id, [])
        src = request.block_hashes
        if len(salted) < len(src):
            salt = self.hash_salt
            salted.extend(h | salt for h in src[len(salted):])
        return salted

    def hit_blocks(self, hashes: Sequence[int], max_hit_blocks: int) -> list[KVCacheBlock]:
        """The cached blocks of the longest prefix hit of at most ``max_hit_blocks`` blocks:
        every block from the start, or with a sliding window those it reaches (RELEASED
        before them)."""
        if self.sliding_window is not None:
            return self._window_hit(hashes, max_hit_blocks)
        hit_blocks = []
        for i in range(max_hit_blocks):
            block = self.block_pool.get_cached_block(hashes[i])
            if block is None:
                break
            hit_blocks.append(block)
        return hit_blocks

    def _window_hit(self, hashes: Sequence[int], max_hit_blocks: int) -> list[KVCacheBlock]:
        """The prefix hit of a sliding-window model (vLLM's lookup): the longest prefix whose
        last ``cdiv(sliding_window - 1, block_size)`` blocks, all the next query's window
        reaches, are cached; the blocks before them need not be (RELEASED places). A block's
        hash covers its whole prefix, so a hit on it is a hit on everything before it."""
        need = max(1, -(-(self.sliding_window - 1) // self.block_size))
        get_cached = self.block_pool.get_cached_block
        run = 0
        for i in range(max_hit_blocks - 1, -1, -1):
            if get_cached(hashes[i]) is None:
                run = 0
                continue
            run += 1
            if run >= need or i == 0:
                return [RELEASED] * i + [get_cached(hashes[j]) for j in range(i, i + run)]
        return []

    def allocate_slots(
        self,
        request: "Request",
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] | None = None,
        num_new_computed_tokens: int = 0,
        hits_referenced: bool = False,
    ) -> list[list[int]] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        ``new_computed_blocks`` (a prefix hit from ``get_computed_blocks``, covering
        ``num_new_computed_tokens`` tokens) are referenced and appended first. Returns the
        ids of every block added to the request (hit blocks, then fresh ones), or None when
        too few blocks are free, in which case nothing changes. Evictable cached blocks
        count as free. Blocks that this step fills are registered in the prefix cache.
        The ids come as one list per group (here one). ``hits_referenced``: the caller has
        already referenced the hit blocks (the hybrid manager, which references every group's
        before any group takes fresh blocks, so that none takes another's evictable hit).
        """
        req_id = request.request_id
        blocks = self.req_to_blocks.get(req_id)
        if blocks is None:
            blocks = self.req_to_blocks[req_id] = []
        computed = new_computed_blocks or ()
        num_total_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_required = -(-num_total_tokens // self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(computed))
        # Hit blocks that are evictable leave the free list when referenced.
        num_evictable_hits = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            return None

        if computed:
            num_leading_released = sum(1 for b in computed if b is RELEASED)  # a window hit's
            if not hits_referenced:
                self.block_pool.touch(computed[num_leading_released:])
            if num_leading_released:
                self.num_released[req_id] = num_leading_released
            blocks.extend(computed)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        # The offload tier's part of the hit: its first fresh blocks are loaded from there.
        offloaded = self.offload_hits.pop(req_id, ()) if num_new_computed_tokens else ()
        for key, block in zip(offloaded, new_blocks):
            self.offload.load(key, block.block_id)

        if self.enable_caching:
            self._cache_full_blocks(request, blocks, min(num_total_tokens, request.num_tokens))
        if computed:
            return [[b.block_id for b in computed] + [b.block_id for b in new_blocks]]
        return [[b.block_id for b in new_blocks]]

    def allocate_lookahead(self, request: "Request", num_tokens: int, keep_free: int) -> list[int]:
        """Fresh blocks so that ``request`` holds slots for ``num_tokens`` tokens past its
        computed ones, taken only when ``keep_free`` blocks stay free; their ids, or [] when
        it needs none or they would crowd others out. (Speculative decoding by a draft model:
        the draft's own passes write KV past the tokens a step schedules.)"""
        need = self.num_new_blocks(request, num_tokens)
        if need == 0 or need > self.block_pool.get_num_free_blocks() - keep_free:
            return []
        new_blocks = self.block_pool.get_new_blocks(need)
        self.req_to_blocks[request.request_id].extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def release_out_of_window(self, requests: Iterable["Request"]) -> int:
        """Free the blocks of each of ``requests`` that no query from its next token on can
        read (those wholly before ``num_computed_tokens - sliding_window + 1``), leaving
        RELEASED in their places; returns how many. A no-op without a sliding window.

        Safe with a step still to run on the workers: the steps run in order, so a block
        handed to another request is written only after the older step read it."""
        if self.sliding_window is None:
            return 0
        freed = 0
        for request in requests:
            blocks = self.req_to_blocks.get(request.request_id)
            if not blocks:
                continue
            end = min(max(0, request.num_computed_tokens - self.sliding_window + 1) // self.block_size, len(blocks))
            start = self.num_released.get(request.request_id, 0)
            if end <= start:
                continue
            released = blocks[start:end]
            blocks[start:end] = [RELEASED] * (end - start)
            self.num_released[request.request_id] = end
            self.block_pool.free_blocks(reversed(released))
            freed += end - start
        return freed

    def num_new_blocks(self, request: "Request", num_new_tokens: int) -> int:
        """How many fresh blocks ``allocate_slots(request, num_new_tokens)`` would take."""
        num_total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-num_total // self.block_size) - len(self.req_to_blocks.get(request.request_id, ())))

    def _cache_full_blocks(self, request: "Request", blocks: list[KVCacheBlock], num_tokens: int) -> None:
        num_full_blocks = num_tokens // self.block_size
        req_id = request.request_id  # RELEASED places are never registered
        num_cached = max(self.num_cached_blocks.get(req_id, 0), self.num_released.get(req_id, 0))
        if num_full_blocks <= num_cached:
            return
        update_request_block_hashes(request, self.block_size, request.block_hash_extra_keys)
        first = len(self.step_registered)
        self.block_pool.cache_full_blocks(request, blocks, num_cached, num_full_blocks, self.step_registered,
                                          hashes=self.hashes(request))
        if self.offload is not None:  # only the offload tier asks (_on_evict)
            self.step_registered_ids.update(b.block_id for b in self.step_registered[first:])
        self.num_cached_blocks[request.request_id] = num_full_blocks

    def free(self, request: "Request") -> None:
        """Release every block of ``request``; its tail becomes evictable before its prefix.

        Safe to call for a request that holds no blocks.
        """
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        released = self.num_released.pop(request.request_id, 0)
        self._salted_hashes.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks[released:]))

    def get_block_ids(self, request_id: str) -> list[list[int]]:
        """The request's block ids in sequence order ([] if it holds none), one new list per
        group (here one)."""
        return [[b.block_id for b in self.req_to_blocks.get(request_id, ())]]

    def get_num_common_prefix_blocks(self, running_request: "Request", num_running_requests: int) -> int:
        """Number of leading blocks of ``running_request`` shared by all running requests.

        A block is shared by all of them exactly when its ref_cnt equals their number,
        since only running requests hold references (a RELEASED place never is).
        """
        n = 0
        for block in self.req_to_blocks.get(running_request.request_id, ()):
            if block.ref_cnt != num_running_requests:
                break
            n += 1
        return n

    @property
    def usage(self) -> float:
        """Fraction of KV blocks in use (0.0 to 1.0)."""
        return self.block_pool.get_usage()

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prefix-cache hits over queried tokens since start (0.0 before any query)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def reset_prefix_cache(self, keep_offloaded: bool = False) -> None:
        """Forget every cached prefix and the hit statistics; the offload tier's index too
        unless ``keep_offloaded`` (the device's KV is dropped but the tiers' stay valid). The
        engine clears the workers' stores."""
        self.block_pool.reset_prefix_cache()
        if self.offload is not None and not keep_offloaded:
            self.offload.clear()
        self.prefix_queries = self.prefix_hits = 0

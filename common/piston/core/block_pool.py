"""BlockPool: the fixed set of KV-cache blocks, their LRU free list and the prefix cache.

Every block id in ``[0, num_blocks)`` is usable; no null block is reserved (the KV cache
manager's place of a released sliding-window block, RELEASED, is never sent to a worker).

A block is in exactly one of two states:
- in use: ``ref_cnt > 0``, not in the free list;
- free: ``ref_cnt == 0``, in the free list. A free block may still carry a hash and sit in
  the cached-hash map: it is *evictable*. Eviction is lazy: it happens only when the
  block is handed out again, and a prefix hit before then revives it (``touch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

if TYPE_CHECKING:
    from piston.core.request import Request


class KVCacheBlock:
    """One block of KV-cache slots, with its free-list links."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks; head = next to evict (LRU).

    The links live in the blocks themselves and the ends are sentinel blocks, so
    ``popleft``, ``remove``, ``append`` and ``appendleft`` are O(1) and allocate nothing.
    """

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.head.next_free = self.tail
        self.tail.prev_free = self.head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        """Unlink and return the least recently freed block; ValueError when empty."""
        block = self.head.next_free
        if block is self.tail:
            raise ValueError("no free KV-cache blocks left")
        self.remove(block)  # type: ignore[arg-type]
        return block  # type: ignore[return-value]

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink a block that is in the list."""
        block.prev_free.next_free = block.next_free  # type: ignore[union-attr]
        block.next_free.prev_free = block.prev_free  # type: ignore[union-attr]
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Link a block at the tail: evicted last."""
        last = self.tail.prev_free
        last.next_free = block  # type: ignore[union-attr]
        block.prev_free = last
        block.next_free = self.tail
        self.tail.prev_free = block
        self.num_free_blocks += 1

    def appendleft(self, block: KVCacheBlock) -> None:
        """Link a block at the head: reused first."""
        first = self.head.next_free
        first.prev_free = block  # type: ignore[union-attr]
        block.next_free = first
        block.prev_free = self.head
        self.head.next_free = block
        self.num_free_blocks += 1

    def __iter__(self):
        block = self.head.next_free
        while block is not self.tail:
            yield block
            block = block.next_free  # type: ignore[union-attr]


class BlockPool:
    """Hands out and takes back KV blocks and keeps the hash -> block prefix cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        # One block per hash: a duplicate computed while the first is in use stays unhashed
        # (one computed while the first is evictable replaces it: cache_full_blocks).
        self.cached_block_hash_to_block: dict[int, KVCacheBlock] = {}
        # Called with a cached block about to be handed out again (the KV offload tier).
        self.on_evict: Callable[[KVCacheBlock], None] | None = None

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        """The block holding ``block_hash`` (in use or evictable), or None."""
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the LRU end, evicting their cached hashes.

        The returned blocks have ``ref_cnt == 1`` and no hash. Raises ValueError when
        fewer blocks are free; callers check ``get_num_free_blocks`` first.
        """
        if num_blocks > self.free_block_queue.num_free_blocks:
            raise ValueError(
                f"asked for {num_blocks} KV blocks, only {self.free_block_queue.num_free_blocks} free"
            )
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            if block.block_hash is not None:
                if self.on_evict is not None:
                    self.on_evict(block)
                self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: KVCacheBlock) -> None:
        if self.cached_block_hash_to_block.get(block.block_hash) is block:  # type: ignore[arg-type]
            del self.cached_block_hash_to_block[block.block_hash]  # type: ignore[arg-type]
        block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference on each block (a prefix hit); revive evictable ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference on each block, in eviction order (first freed, first evicted).

        Callers pass a request's blocks in reverse so a sequence's tail is evicted before
        its prefix, which other requests are more likely to share. Blocks without a hash
        hold nothing reusable and go to the head, to be reused before any cached block.
        """
        queue = self.free_block_queue
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    queue.appendleft(block)
                else:
                    queue.append(block)

    def cache_full_blocks(
        self,
        request: "Request",
        blocks: Sequence[KVCacheBlock],
        num_cached_blocks: int,
        num_full_blocks: int,
        registered: list[KVCacheBlock] | None = None,
        hashes: Sequence[int] | None = None,
    ) -> None:
        """Register ``blocks[num_cached_blocks:num_full_blocks]`` under the request's hashes.

        ``request.block_hashes`` must already cover ``num_full_blocks`` blocks. Blocks that
        came from a prefix hit already hold their hash and are left alone. The blocks given a
        hash here are appended to ``registered``, when given. ``hashes``: the keys to use
        instead of the request's own (a hybrid model's salted group keys).
        """
        if not self.enable_caching:
            return
        cache = self.cached_block_hash_to_block
        hashes = request.block_hashes if hashes is None else hashes
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:
                continue
            block_hash = hashes[i]
            cached = cache.get(block_hash)
            if cached is not None and cached.ref_cnt == 0:
                # An evictable block holds the same KV (a hit that did not reach it): the block
                # in use takes its place, so the prefix does not lose the block when the
                # evictable one is handed out; the old one becomes a plain free block.
                self._evict(cached)
                self.free_block_queue.remove(cached)
                self.free_block_queue.appendleft(cached)
                cached = None
            if cached is None:
                block.block_hash = block_hash
                cache[block_hash] = block
                if registered is not None:
                    registered.append(block)

    def uncache(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Forget the hashes of ``blocks`` (their KV was never written); their references stay."""
        for block in blocks:
            if block.block_hash is not None:
                self._evict(block)

    def get_num_free_blocks(self) -> int:
        """Blocks that can be handed out now, evictable cached blocks included."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of blocks in use (0.0 to 1.0)."""
        return 1.0 - self.free_block_queue.num_free_blocks / self.num_blocks

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after a weight update). Blocks in use stay in use."""
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()

"""KVOffloadIndex: the scheduler's view of the prefix cache's second tier.

When the block pool hands out a free block that still holds a cached prefix (an eviction),
the block's contents are saved under its hash to host memory (up to
``kv_offload_host_blocks`` blocks) and, past that, to disk (``kv_offload_disk_blocks``
files): the least recently used host blocks spill to disk, the least recently used files
are deleted. A later request whose prefix runs past the device's cached blocks into this
index loads the rest into fresh device blocks instead of computing them again.

This class only decides; the orders go to every worker with the step (a KVTransfer), and
each worker's KVTierStore (piston.step.kv_transfer) moves the bytes before the step's
forward pass. Both sides apply the same orders, so they stay in agreement. On start-up
the index reads the disk tier's directory, so a restarted engine gets hits on its first
request.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Iterable, Sequence

from piston.step.kv_transfer import DISK, HOST, KVTransfer, block_key

logger = logging.getLogger(__name__)


class KVOffloadIndex:
    def __init__(self, host_blocks: int, disk_blocks: int = 0, directory: str | None = None,
                 num_ranks: int = 1) -> None:
        self.host_blocks = host_blocks
        self.disk_blocks = disk_blocks if directory else 0
        self.host: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.disk: OrderedDict[str, None] = OrderedDict()
        self.pinned: set[str] = set()  # found by a lookup, to be loaded: never evicted meanwhile
        self.transfer = KVTransfer()
        self.num_saved = self.num_loaded = 0
        if self.disk_blocks:
            self._read_directory(directory, num_ranks)

    def _read_directory(self, directory: str, num_ranks: int) -> None:
        """Index the blocks an earlier engine left (every rank's file present), oldest first."""
        if not os.path.isdir(directory):
            return
        names = set(os.listdir(directory))
        found = []
        for name in names:
            key, _, rest = name.partition(".")
            if rest == "0.kv" and all(f"{key}.{r}.kv" in names for r in range(1, num_ranks)):
                found.append((os.path.getmtime(os.path.join(directory, name)), key))
        for _, key in sorted(found):
            self.disk[key] = None
        self._fit_disk()
        if self.disk:
            logger.info("KV offload: %d blocks found on disk in %s.", len(self.disk), directory)

    def __len__(self) -> int:
        return len(self.host) + len(self.disk)

    def lookup(self, block_hashes: Sequence[int]) -> list[str]:
        """The keys of the longest run of ``block_hashes`` (from its start) the tiers hold,
        pinned until ``load`` or ``unpin``."""
        keys = []
        for h in block_hashes:
            key = block_key(h)
            if key not in self.host and key not in self.disk:
                break
            keys.append(key)
        self.pinned.update(keys)
        return keys

    def unpin(self, keys: Iterable[str]) -> None:
        self.pinned.difference_update(keys)

    def load(self, key: str, block_id: int) -> None:
        """Order ``key`` into device block ``block_id`` (this step, before the forward)."""
        self.transfer.loads.append((key, block_id))
        self._touch(key)
        self.pinned.discard(key)
        self.num_loaded += 1

    def save(self, block_id: int, block_hash: int) -> None:
        """Device block ``block_id``, holding ``block_hash``, is being reused: keep its bytes
        (in host memory; on disk when there is no host tier)."""
        key = block_key(block_hash)
        if key in self.host:
            self.host.move_to_end(key)
        elif self.host_blocks:
            self._order_save(block_id, key, HOST)
            self.host[key] = None
            self._fit_host()
        else:
            self.persist(block_id, block_hash)

    def persist(self, block_id: int, block_hash: int) -> None:
        """Write device block ``block_id`` (``block_hash``, its KV computed) to the disk
        tier, if there is one and it lacks the block: the disk tier is written through, so it
        holds what a restarted engine can reuse, evicted or not."""
        key = block_key(block_hash)
        if key in self.disk:
            self.disk.move_to_end(key)
        elif self.disk_blocks:
            self._order_save(block_id, key, DISK)
            self.disk[key] = None
            self._fit_disk()

    def _order_save(self, block_id: int, key: str, tier: int) -> None:
        if (key, tier) in self.transfer.drops:  # dropped earlier this step: the save must survive it
            self.transfer.drops.remove((key, tier))
        self.transfer.saves.append((block_id, key, tier))
        self.num_saved += 1

    def _touch(self, key: str) -> None:
        for tier in (self.host, self.disk):
            if key in tier:
                tier.move_to_end(key)

    def _victim(self, tier: OrderedDict) -> str | None:
        for key in tier:
            if key not in self.pinned:
                return key
        return None

    def _fit_host(self) -> None:
        while len(self.host) > self.host_blocks and (key := self._victim(self.host)) is not None:
            del self.host[key]
            if self.disk_blocks and key not in self.disk:
                self.transfer.spills.append(key)
                self.disk[key] = None
                self._fit_disk()
            else:
                self.transfer.drops.append((key, HOST))

    def _fit_disk(self) -> None:
        while len(self.disk) > self.disk_blocks and (key := self._victim(self.disk)) is not None:
            del self.disk[key]
            self.transfer.drops.append((key, DISK))

    def take_transfer(self) -> KVTransfer | None:
        """This step's orders (None when there are none); the next step starts empty."""
        t, self.transfer = self.transfer, KVTransfer()
        return t if t else None

    def clear(self) -> None:
        """Forget everything (the workers clear their stores themselves)."""
        self.host.clear()
        self.disk.clear()
        self.pinned.clear()
        self.transfer = KVTransfer()

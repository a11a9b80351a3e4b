"""KVOffloadIndex: the orders the scheduler gives the workers' stores, and its LRU tiers;
KVTierStore: carrying the orders out (host memory, files, spills, drops)."""

from __future__ import annotations

import numpy as np
import pytest

from piston.core.kv_offload import KVOffloadIndex
from piston.step.kv_transfer import DISK, HOST, KVTierStore, KVTransfer, block_key


def k(h: int) -> str:
    return block_key(h)


def test_host_tier_saves_then_spills_its_least_recent_block_to_disk(tmp_path):
    index = KVOffloadIndex(host_blocks=2, disk_blocks=2, directory=str(tmp_path))
    index.save(10, 1)
    index.save(11, 2)
    index.save(10, 1)  # already held: touched (now the most recent), no second save
    index.save(12, 3)  # host over capacity: 2, the least recent, spills
    t = index.take_transfer()
    assert t.saves == [(10, k(1), HOST), (11, k(2), HOST), (12, k(3), HOST)]
    assert t.spills == [k(2)] and t.drops == []
    assert list(index.host) == [k(1), k(3)] and list(index.disk) == [k(2)]
    assert index.take_transfer() is None


def test_disk_tier_is_written_through_and_drops_its_least_recent_file(tmp_path):
    index = KVOffloadIndex(host_blocks=0, disk_blocks=2, directory=str(tmp_path))
    for block, h in ((1, 7), (2, 8), (1, 7), (3, 9)):
        index.persist(block, h)
    t = index.take_transfer()
    assert t.saves == [(1, k(7), DISK), (2, k(8), DISK), (3, k(9), DISK)]
    assert t.drops == [(k(8), DISK)]  # 7 was touched again, so 8 is the least recent


def test_lookup_finds_the_leading_run_and_pins_it_against_eviction():
    index = KVOffloadIndex(host_blocks=2)
    index.save(1, 100)
    index.save(2, 101)
    index.take_transfer()
    assert index.lookup([100, 101, 102, 100]) == [k(100), k(101)]
    index.save(3, 200)  # full, and both are pinned: the new block is the one that goes
    assert list(index.host) == [k(100), k(101)]
    index.load(k(100), 5)
    index.load(k(101), 6)
    index.save(4, 201)  # unpinned now: the least recent go
    t = index.take_transfer()
    assert t.loads == [(k(100), 5), (k(101), 6)]
    assert t.drops == [(k(200), HOST), (k(100), HOST)]


def test_a_save_after_a_drop_in_the_same_step_survives():
    index = KVOffloadIndex(host_blocks=1)
    index.save(1, 5)
    index.save(2, 6)  # drops 5
    index.save(3, 5)  # 5 comes back (drops 6)
    t = index.take_transfer()
    assert (k(5), HOST) not in t.drops and (3, k(5), HOST) in t.saves
    assert list(index.host) == [k(5)]


def test_store_carries_out_saves_loads_spills_and_drops(tmp_path):
    device = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6)  # 4 blocks of 6 bytes

    def read(ids):
        return device[ids].copy()

    def write(ids, data):
        device[ids] = data

    store = KVTierStore(str(tmp_path), rank=0)
    original = device.copy()
    store.apply(KVTransfer(saves=[(0, "a", HOST), (1, "b", DISK)]), read, write)
    store.flush()
    assert (tmp_path / "b.0.kv").exists()
    device[:] = 0
    store.apply(KVTransfer(loads=[("a", 2), ("b", 3)], spills=["a"]), read, write)
    assert np.array_equal(device[2], original[0]) and np.array_equal(device[3], original[1])
    store.flush()
    assert (tmp_path / "a.0.kv").exists() and not store.host
    store.apply(KVTransfer(drops=[("a", DISK)]), read, write)
    assert not (tmp_path / "a.0.kv").exists()
    with pytest.raises(RuntimeError, match="not in the store"):
        store.apply(KVTransfer(loads=[("a", 0)]), read, write)
    store.close()


def test_a_restarted_index_finds_the_files_of_every_rank(tmp_path):
    for name in ("aa.0.kv", "aa.1.kv", "bb.0.kv", "cc.1.kv", "junk.txt"):
        (tmp_path / name).write_bytes(b"x")
    index = KVOffloadIndex(host_blocks=0, disk_blocks=10, directory=str(tmp_path), num_ranks=2)
    assert list(index.disk) == ["aa"]  # bb and cc lack a rank's file

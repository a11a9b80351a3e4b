"""KV blocks between the KV cache and the prefix cache's offload tiers, on the worker side.

The scheduler decides (piston.core.kv_offload.KVOffloadIndex) and sends its orders with a
step, as a ``KVTransfer``; each worker carries them out with its ``KVTierStore`` at the
start of the step, before the forward pass writes any block:

1. ``saves``: copy device blocks out under their hash, to host memory or straight to disk
   (their blocks are about to be reused, so this comes first);
2. ``loads``: copy stored blocks into device blocks (prefix hits on the tiers);
3. ``spills``: move blocks from host memory to disk (written by a background thread);
4. ``drops``: forget blocks, in one tier.

A block travels as raw bytes (``[blocks, bytes per block]`` uint8), so the store knows
nothing of dtypes or layouts: the platform's runner reads and writes its own cache
(``ModelRunner.read_kv_blocks`` / ``write_kv_blocks``). Each tensor-parallel rank stores its
own shard, in files ``<hash>.<rank>.kv`` under the directory ``tier_directory`` gives.

This is the seam for an external store (LMCache-style): a class with this one's
constructor, ``apply``, ``clear`` and ``close``, named by ``--kv-offloading-backend
module:Class``, receives the same orders (the scheduler-side index stays the native one)
and keeps the bytes wherever it likes, with no change to the core.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import queue
import threading
from typing import Callable

import msgspec
import numpy as np

HOST, DISK = 0, 1


class KVTransfer(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    saves: list[tuple[int, str, int]] = []  # (device block id, hash, HOST or DISK)
    loads: list[tuple[str, int]] = []  # (hash, device block id)
    spills: list[str] = []  # host -> disk
    drops: list[tuple[str, int]] = []  # (hash, HOST or DISK)

    def __bool__(self) -> bool:
        return bool(self.saves or self.loads or self.spills or self.drops)


def block_key(block_hash: int) -> str:
    """A block hash (128 bits: msgpack carries at most 64) as the hex name its files get."""
    return f"{block_hash:032x}"


def tier_directory(config) -> str | None:
    """Where the disk tier of this model keeps its files: ``kv_offloading_dir`` / a
    fingerprint of everything that decides a block's bytes (model, dtype, KV cache dtype, block
    size, the KV layout, the platform, the tensor-parallel size). None without a disk tier."""
    cc, mc = config.cache_config, config.model_config
    if not cc.kv_offloading_dir:
        return None
    facts = {"model": os.path.abspath(mc.path) if mc.path else mc.model, "dtype": mc.dtype,
             "quantization": mc.quantization, "block_size": cc.block_size, "layers": mc.num_layers,
             "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "platform": config.platform,
             "tp": config.parallel_config.tensor_parallel_size}
    if config.kv_cache_dtype != mc.dtype:  # (absent otherwise: the directories of before stay valid)
        facts["kv_cache_dtype"] = config.kv_cache_dtype
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cc.kv_offloading_dir, digest)


def store_class(backend: str) -> type:
    """The workers' store for ``kv_offloading_backend``: KVTierStore for "native", else the
    class ``module:Class`` names."""
    if backend == "native":
        return KVTierStore
    module, _, name = backend.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"kv_offloading_backend={backend!r}: cannot import it ({e}).") from e
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("apply", "clear", "close")):
        raise ValueError(f"kv_offloading_backend={backend!r}: expected 'native' or 'module:Class' of a class "
                         "with apply, clear and close.")
    return cls


class KVTierStore:
    """This rank's offloaded blocks: a dict in host memory and, with ``directory``, files."""

    def __init__(self, directory: str | None, rank: int = 0) -> None:
        self.directory = directory
        self.rank = rank
        self.host: dict[str, np.ndarray] = {}
        # Blocks on their way to disk, readable until written (guarded by the lock).
        self.pending: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()
        self.writes: queue.Queue = queue.Queue()
        self.writer: threading.Thread | None = None
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.writer = threading.Thread(target=self._write_loop, name="piston-kv-writer", daemon=True)
            self.writer.start()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.{self.rank}.kv")

    def apply(self, t: KVTransfer, read_blocks: Callable[[np.ndarray], np.ndarray],
              write_blocks: Callable[[np.ndarray, np.ndarray], None]) -> None:
        if t.saves:
            data = read_blocks(np.array([b for b, _, _ in t.saves], dtype=np.int64))
            for (_, key, tier), block in zip(t.saves, data):
                block = block.copy()
                if tier == HOST:
                    self.host[key] = block
                else:
                    self._write_later(key, block)
        if t.loads:
            data = np.stack([self._get(key) for key, _ in t.loads])
            write_blocks(np.array([b for _, b in t.loads], dtype=np.int64), data)
        for key in t.spills:
            self._write_later(key, self.host.pop(key))
        for key, tier in t.drops:
            if tier == HOST:
                self.host.pop(key, None)
            else:
                self._delete(key)

    def _get(self, key: str) -> np.ndarray:
        block = self.host.get(key)
        if block is None:
            with self.lock:
                block = self.pending.get(key)
        if block is None and self.directory and os.path.exists(self.path(key)):
            block = np.fromfile(self.path(key), dtype=np.uint8)
        if block is None:
            raise RuntimeError(f"KV offload: block {key} is not in the store; the scheduler's index and "
                               "the store disagree (was the directory changed while the engine ran?).")
        return block

    def _write_later(self, key: str, block: np.ndarray) -> None:
        with self.lock:
            self.pending[key] = block
        self.writes.put(key)

    def _write_loop(self) -> None:
        while (key := self.writes.get()) is not None:
            with self.lock:
                block = self.pending.get(key)
            if block is not None:
                tmp = f"{self.path(key)}.tmp"
                block.tofile(tmp)
                os.replace(tmp, self.path(key))  # a reader never sees half a block
                with self.lock:
                    if self.pending.get(key) is block:
                        del self.pending[key]
                    else:  # dropped while being written
                        self._unlink(key)
            self.writes.task_done()

    def _delete(self, key: str) -> None:
        with self.lock:
            self.pending.pop(key, None)
        if self.directory:
            self._unlink(key)

    def _unlink(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def flush(self) -> None:
        """Wait until every spilled block is on disk."""
        if self.writer is not None:
            self.writes.join()

    def clear(self) -> None:
        """Forget every block, on disk too (the weights changed: the KV is stale)."""
        self.flush()
        self.host.clear()
        if self.directory:
            for name in os.listdir(self.directory):
                if name.endswith(f".{self.rank}.kv"):
                    self._unlink(name.split(".")[0])

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writes.put(None)
            self.writer.join(timeout=10)
            self.writer = None

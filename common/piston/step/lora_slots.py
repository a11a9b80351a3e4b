"""LoRASlots: which adapter sits in which device slot, and the adapters kept in host memory.

A runner with LoRA on (EngineConfig.lora_config) holds ``max_loras`` device slots: each
LoRA layer stacks its slots' matrices, and each token of a step carries the slot of its
request's adapter (-1: none), so one forward pass serves rows of different adapters
(piston.models.layers.lora on torch; the JAX model on TPU).

Adapters are read from disk once and kept in host memory, ``max_cpu_loras`` of them, the
least recently used evicted first; an adapter a request still needs after eviction is read
again. A step's adapters are put in slots before its forward pass; a slot whose adapter
this step does not use may be overwritten (least recently used first). The scheduler
keeps a step's distinct adapters within ``max_loras``, so they always fit.

Torch-free: the platform supplies ``write_slot(slot, adapter)``, which copies an adapter
(or zeros, for None) into every LoRA layer's slot.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Sequence

import numpy as np

from piston.step.config import LoRAConfig
from piston.step.lora_adapter import LoRAAdapter, LoRAModelDims, load_adapter
from piston.step.lora_request import LoRARequest

logger = logging.getLogger(__name__)


class LoRASlots:
    """Adapters are told apart by their whole LoRARequest (id, name and folder): an id that
    an application reuses for another folder, even while requests of the old one still run,
    is another adapter with its own host copy and slot."""

    def __init__(self, config: LoRAConfig, dims: LoRAModelDims,
                 write_slot: Callable[[int, LoRAAdapter | None], None]) -> None:
        self.config = config
        self.dims = dims
        self.write_slot = write_slot
        self.host: collections.OrderedDict[LoRARequest, LoRAAdapter] = collections.OrderedDict()
        self.slot_ids: list[LoRARequest | None] = [None] * config.max_loras  # each slot's adapter
        self.slot_used = [0] * config.max_loras  # the step that last used each slot (LRU)
        self.step = 0
        self.removed: set[int] = set()  # ids unloaded while requests used them: dropped once unused

    # ----- host memory ----------------------------------------------------------------

    def add(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of ``request``, read from disk unless it is in host memory (it becomes
        the most recently used). LoRAAdapterError when it cannot be served."""
        adapter = self.host.get(request)
        if adapter is not None:
            self.host.move_to_end(request)
            return adapter
        start = time.perf_counter()
        adapter = load_adapter(request, self.dims, self.config.max_lora_rank)
        self.host[request] = adapter
        while len(self.host) > self.config.host_capacity:
            evicted, _ = self.host.popitem(last=False)
            logger.info("LoRA adapter %r (id %d) evicted from host memory (max_cpu_loras=%d).", evicted.lora_name,
                        evicted.lora_int_id, self.config.host_capacity)
        logger.info("Loaded LoRA adapter %r (id %d, rank %d, %d modules, %.1f MB) from %s in %.2f s.",
                    request.lora_name, request.lora_int_id, adapter.rank, len(adapter.weights),
                    adapter.nbytes / 1e6, request.lora_path, time.perf_counter() - start)
        return adapter

    def remove(self, lora_int_id: int, in_use: bool) -> bool:
        """Forget the adapters of id ``lora_int_id`` (host copies and slots); with ``in_use``
        (requests still use it) only once they are gone (``release_unused``). False if none
        was loaded."""
        known = any(r.lora_int_id == lora_int_id for r in self._loaded())
        if in_use:
            self.removed.add(lora_int_id)
            return known
        self._drop(lora_int_id)
        return known

    def release_unused(self, in_use: set[int]) -> None:
        """Drop the removed adapters that no request uses any more."""
        for lora_int_id in [i for i in self.removed if i not in in_use]:
            self.removed.discard(lora_int_id)
            self._drop(lora_int_id)

    def loaded_ids(self) -> list[int]:
        return sorted({r.lora_int_id for r in self._loaded()})

    def forget_slots(self) -> None:
        """Zero every slot (their memory was lost, e.g. to sleep mode); adapters are written
        again when a step uses them."""
        for slot in range(len(self.slot_ids)):
            self.slot_ids[slot] = None
            self.write_slot(slot, None)

    def _loaded(self) -> set[LoRARequest]:
        return set(self.host) | {r for r in self.slot_ids if r is not None}

    def _drop(self, lora_int_id: int) -> None:
        for request in [r for r in self.host if r.lora_int_id == lora_int_id]:
            del self.host[request]
        for slot, held in enumerate(self.slot_ids):
            if held is not None and held.lora_int_id == lora_int_id:
                self.slot_ids[slot] = None
                self.write_slot(slot, None)

    # ----- device slots ------------------------------------------------------------------

    def slots_for(self, requests: Sequence[LoRARequest | None]) -> np.ndarray:
        """int32 [len(requests)]: each request's slot (-1: no adapter), putting adapters
        into slots as needed. RuntimeError if they need more than ``max_loras`` slots."""
        self.step += 1
        out = np.full(len(requests), -1, dtype=np.int32)
        wanted = list(dict.fromkeys(r for r in requests if r is not None))
        if not wanted:
            return out
        if len(wanted) > len(self.slot_ids):
            raise RuntimeError(f"A step uses {len(wanted)} LoRA adapters, more than max_loras="
                               f"{len(self.slot_ids)}: the scheduler must keep them within it.")
        slot_of = {held: slot for slot, held in enumerate(self.slot_ids) if held in wanted}
        for request in wanted:
            if request not in slot_of:
                free = [s for s in range(len(self.slot_ids)) if self.slot_ids[s] not in slot_of]
                slot = min(free, key=lambda s: (self.slot_ids[s] is not None, self.slot_used[s]))
                self.write_slot(slot, self.add(request))
                self.slot_ids[slot] = request
                slot_of[request] = slot
            self.slot_used[slot_of[request]] = self.step
        for i, r in enumerate(requests):
            if r is not None:
                out[i] = slot_of[r]
        return out

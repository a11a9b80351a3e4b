"""Float32 linear weights packed once for the C++ packed GEMM (csrc/packed_gemm.cpp).

torch's CPU GEMM repacks the weight on every call, and at decode-sized batches (a dozen to a
few hundred rows of x) that, with its blocking for square problems, holds it to 0.5-0.7 of
the matmul peak. ``packed_linear`` reads a copy of the weight packed once at load (blocks of
32 output columns side by side in an AVX-512 build, 16 in an AVX2 one) and takes every step
of up to MAX_ROWS rows when the copy exists: on SmolLM2's shapes it is level with the
row-streaming linear of cpu_kernels.cpp at one row (both stream the weight at memory speed),
ahead of it from 4 rows, and ahead of torch's GEMM up to 2048 rows, in both builds
(benchmarks/RESULTS.md, 2026-12-06 (later)).

The copy costs memory: as much again as the float32 linear weights (and the LM head's).
``PISTON_CPU_PACKED_WEIGHTS`` chooses: ``auto`` (default) packs when the copies take at most
a quarter of the memory available at load, ``1`` always, ``0`` never.

A ``PackedSlot`` belongs to one layer; ``PackedWeights`` holds a model's slots and packs
them again when the weights change (the CPU worker calls ``release`` when they go to sleep
and ``pack`` after they are woken, reloaded or updated).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger(__name__.replace("piston_cpu", "piston.cpu", 1))

# The most rows of x the packed GEMM takes (a step's tokens; 2048 by default): measured level
# with or ahead of torch's GEMM up to 2048 rows; past this, torch's GEMM.
MAX_ROWS = 4096
AUTO_SHARE = 0.25  # auto: pack when the copies fit in this share of the available memory


def setting() -> str:
    value = os.environ.get("PISTON_CPU_PACKED_WEIGHTS", "auto").lower()
    if value not in ("auto", "0", "1", "off", "on", "false", "true"):
        raise ValueError(f"PISTON_CPU_PACKED_WEIGHTS={value!r}: use auto, 1 or 0.")
    return {"off": "0", "false": "0", "on": "1", "true": "1"}.get(value, value)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PackedSlot:
    """One layer's packed copy: ``packed`` (None until packed, or after release) was made
    from ``source``, the weight tensor the layer passes to its kernel."""

    __slots__ = ("out_features", "packed", "source")

    def __init__(self, source: torch.Tensor) -> None:
        self.source = source
        self.out_features = source.shape[0]
        self.packed: torch.Tensor | None = None

    def current(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy when it is ``weight``'s, else None."""
        return self.packed if weight is self.source else None


class PackedWeights:
    """The packed copies of a worker's models (the target's and a draft model's layers)."""

    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops
        self.slots: list[tuple[object, PackedSlot]] = []  # (module, slot)
        self.enabled = setting() != "0" and hasattr(ops, "packed_linear")

    def slot(self, module) -> PackedSlot | None:
        """A slot for a layer with a float32 ``weight`` (None when packing is off)."""
        if not self.enabled:
            return None
        slot = PackedSlot(module.weight)
        self.slots.append((module, slot))
        return slot

    def nbytes(self) -> int:
        """What the copies take (or would take), zero-padded to whole blocks."""
        width = self.ops.packed_gemm_width()
        return sum(-(-slot.out_features // width) * width * module.weight.shape[1] * 4 for module, slot in self.slots)

    @torch.no_grad()
    def pack(self) -> None:
        """Packs every slot from its layer's current weight (again after a change), in place
        where the shape is unchanged so that the decoder stack's reference stays current.
        With ``auto``, skips (and frees) them all when they would not fit (AUTO_SHARE)."""
        if not self.slots:
            return
        need = self.nbytes()
        if setting() == "auto":
            held = sum(s.packed.numel() * 4 for _, s in self.slots if s.packed is not None)
            room = available_memory() + held
            if need > AUTO_SHARE * room:
                self.release()
                logger.info("CPU kernels: float32 weights not packed for the packed GEMM (%.2f GB of copies, "
                            "%.2f GB available; PISTON_CPU_PACKED_WEIGHTS=1 packs anyway).", need / 1e9, room / 1e9)
                return
        for module, slot in self.slots:
            weight = module.weight
            if weight.dtype != torch.float32 or weight.dim() != 2 or not weight.is_contiguous() or weight.numel() == 0:
                slot.packed, slot.source = None, weight
                continue
            fresh = self.ops.pack_linear_weight(weight)
            if slot.packed is not None and slot.packed.shape == fresh.shape:
                slot.packed.copy_(fresh)
            else:
                slot.packed = fresh
            slot.source, slot.out_features = weight, weight.shape[0]
        logger.info("CPU kernels: %d float32 weights packed for the packed GEMM (%.2f GB; up to %d rows of x).",
                    len(self.slots), need / 1e9, MAX_ROWS)

    def release(self) -> None:
        """Frees every copy (the weights go to sleep, or will not fit). The tensors are
        emptied in place: a decoder stack built on them holds them too."""
        for _, slot in self.slots:
            if slot.packed is not None:
                slot.packed.set_()
            slot.packed = None

    def packed_count(self) -> int:
        return sum(1 for _, s in self.slots if s.packed is not None)

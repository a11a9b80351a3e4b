"""The greedy LM head (csrc/greedy_head.cpp): a step's argmax tokens without its logits.

When every row of a step is greedy and none asks for logprobs (``SamplingBatch.plain_greedy``),
the runner asks the model for ``greedy_tokens`` instead of the logits. On a float32 LM head
(its own or the tied embedding), or a packed (GGUF) one of a single segment that the C++
kernels take, this module sets the head's ``greedy_kernel``: the C++
kernel screens the whole vocabulary with int8 dot products (AVX-512 VNNI) under an error
bound that holds for every logit, and computes the float32 dot product only for the few
tokens the bound cannot rule out. The answer is the argmax of float32 logits, as
``torch.argmax`` picks it (lowest index among equals), not an approximation. A packed head's
copy is made from its decoded values, and its candidates' rows are decoded to be rescored.

x enters the screen as int16 (two byte planes: twice the integer work) or int8. One byte
suits hidden states without outliers (dummy weights: 8 candidates a row); real models' have
a few channels many times the others, which set one byte's scale for all (SmolLM2: hundreds
of candidates a row with int8, two or three with int16). Each head starts with int16, tries
int8 after a few calls and keeps it while its rows stay narrow (at most ``NARROW``
candidates a row, none computed in full); a step that is not goes back to int16, and the
next try waits twice as long. Either way the tokens are the same.

The int8 copy takes a quarter of the head's float32 bytes. ``PISTON_CPU_GREEDY_HEAD``:
``auto`` (default) where the CPU has AVX-512 VNNI and the copy fits in a quarter of the
available memory; ``1`` also without VNNI (scalar code, slow: for tests); ``0`` never.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from torch import nn

from piston_cpu.layer_kernels import int8_activations
from piston_cpu.packed_weights import AUTO_SHARE, available_memory

logger = logging.getLogger(__name__.replace("piston_cpu", "piston.cpu", 1))

NARROW = 32  # most candidates a row (on average over a call) for int8 x to stay
FIRST_TRY = 4  # calls with int16 x before the first try of int8


def setting() -> str:
    value = os.environ.get("PISTON_CPU_GREEDY_HEAD", "auto").lower()
    if value not in ("auto", "0", "1", "off", "on", "false", "true"):
        raise ValueError(f"PISTON_CPU_GREEDY_HEAD={value!r}: use auto, 1 or 0.")
    return {"off": "0", "false": "0", "on": "1", "true": "1"}.get(value, value)


class GreedyHead:
    """A head layer's ``greedy_kernel``: ``head(x [N, hidden]) -> int64 [N]``, or None when
    its int8 copy is not that of the layer's current weight (the caller then computes the
    logits). ``stats`` counts rows, rescored candidates and rows computed in full."""

    def __init__(self, ops: ModuleType, module: nn.Module) -> None:
        self.ops = ops
        self.module = module
        self.source: torch.Tensor | None = None  # the weight the copy was made from
        self.prepared: list[torch.Tensor] | None = None
        self.rows: tuple[torch.Tensor, int] | None = None  # weight() when the copy was made
        self.stats = torch.zeros(3, dtype=torch.int64)
        self.planes = 2  # bytes an input of x (module docstring)
        self.wait = self.backoff = FIRST_TRY  # int16 calls left before int8 is tried; the last wait

    def weight(self) -> tuple[torch.Tensor, int] | None:
        """The vocabulary's rows of the layer's weight and their format code (-1: float32;
        else a packed segment's GGUF blocks), where the kernel takes them."""
        module = self.module
        packed = getattr(module, "qweight", None)
        if packed is not None:
            # With int8 activations the packed head's logits are not those of float32 x, which
            # the rescoring computes: those steps keep their logits.
            if module.qkernel is None or len(packed.segments) != 1 or int8_activations():
                return None
            return packed.segments[0][:module.num_real], int(packed.codes[0])
        weight = getattr(module, "weight", None)
        if weight is None or weight.dtype != torch.float32 or weight.dim() != 2 or not weight.is_contiguous():
            return None
        return weight[:module.num_real], -1

    def current(self) -> torch.Tensor | None:
        """The tensor the copy is made from (the weight, or the packed segment)."""
        packed = getattr(self.module, "qweight", None)
        return self.module.weight if packed is None else (packed.segments[0] if packed.segments else None)

    def nbytes(self) -> int:
        return 0 if self.weight() is None else self.module.num_real * (-(-self.module.hidden_size // 4) * 4 + 12)

    @torch.no_grad()
    def prepare(self) -> bool:
        """The int8 copy of the layer's current weight (again after it changed); False, and
        no copy, where the kernel does not take the weight or it is not finite."""
        self.release()
        found = self.weight()
        if found is None:
            return False
        weight, code = found
        if code >= 0:  # a packed head: its decoded values, for as long as the copy takes
            try:
                weight = self.ops.qdequantize([weight], [code], self.module.hidden_size)
            except RuntimeError:  # a format the C++ kernels do not decode
                return False
        if not bool(torch.isfinite(weight).all()):
            return False
        self.prepared = self.ops.greedy_head_prepare(weight)
        self.source, self.rows = self.current(), found
        return True

    def release(self) -> None:
        self.prepared = self.source = self.rows = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.prepared is None or self.current() is not self.source:
            return None
        if x.dtype != torch.float32 or x.dim() != 2 or x.stride(-1) != 1:
            return None
        weight, code = self.rows
        before = self.stats.tolist()
        ids = self.ops.greedy_head_argmax(x, weight, self.prepared, self.stats, self.planes, False, code=code)
        rows, candidates, full = (a - b for a, b in zip(self.stats.tolist(), before))
        if full:  # rows the screen could not narrow: their logits, all rows in one GEMM
            which = ids < 0
            ids[which] = self.module.project(x[which])[:, :self.module.num_real].argmax(-1)
        self._adapt(rows, candidates, full)
        return ids

    def _adapt(self, rows: int, candidates: int, full: int) -> None:
        """The width of x for the next call (module docstring)."""
        if self.planes == 1:
            if full or candidates > NARROW * rows:
                self.backoff = min(2 * self.backoff, 1 << 16)
                self.planes, self.wait = 2, self.backoff
        else:
            self.wait -= 1
            if self.wait <= 0:
                self.planes = 1


class GreedyHeads:
    """The greedy heads of a worker's model; made again when the weights change."""

    def __init__(self, ops: ModuleType | None) -> None:
        self.ops = ops
        self.heads: list[GreedyHead] = []
        mode = setting()
        self.enabled = ops is not None and hasattr(ops, "greedy_head_argmax") and mode != "0" and (
            mode == "1" or ops.greedy_head_fast())

    def install(self, model: nn.Module) -> None:
        """Sets the kernel on the model's logits head, where the model has a plain one
        (``logits_head``, tensor parallelism off)."""
        find = getattr(model, "logits_head", None)
        head = None if find is None or not self.enabled else find()
        if head is None or head.tp_size > 1:
            return
        kernel = GreedyHead(self.ops, head)
        head.greedy_kernel = kernel
        self.heads.append(kernel)

    def prepare(self) -> int:
        """Makes every head's int8 copy; returns how many heads have one."""
        if not self.heads:
            return 0
        need = sum(h.nbytes() for h in self.heads)
        if setting() == "auto" and need > AUTO_SHARE * available_memory():
            self.release()
            logger.info("CPU kernels: no int8 copy of the LM head for greedy steps (%.2f GB would not fit in a "
                        "quarter of the available memory).", need / 1e9)
            return 0
        made = sum(1 for h in self.heads if h.prepare())
        if made:
            logger.info("CPU kernels: greedy steps take their tokens from the LM head's int8 copy (%.1f MB), "
                        "screened with %s and rescored in float32, without the logits.", need / 1e6,
                        "AVX-512 VNNI" if self.ops.greedy_head_fast() else "scalar code")
        return made

    def release(self) -> None:
        for head in self.heads:
            head.release()

    def stats(self) -> dict[str, int]:
        """Rows served, float32 dot products computed for candidates, rows computed in full."""
        rows = cands = full = 0
        for head in self.heads:
            r, c, f = head.stats.tolist()
            rows, cands, full = rows + r, cands + c, full + f
        return {"rows": rows, "candidates": cands, "full_rows": full}

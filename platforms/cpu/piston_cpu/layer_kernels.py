"""Puts Piston's C++ CPU kernels into a loaded model's layers (their ``kernel`` slots).

Only float32 models run eagerly get them: the kernels are float32 AVX2 code, and a
piecewise-compiled model is traced by Dynamo, which cannot look inside them. Each
wrapper falls back to torch for shapes the kernel does not take.

Layers with packed weights (piston.models.layers.quantized) get ``qkernel`` (and the
embedding ``qembed_kernel``): the kernels decode the packed rows themselves, for every
batch. Activations stay float32 unless PISTON_CPU_QUANT_ACTIVATIONS=int8 (int8_activations).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from piston.models.layers.fused_moe import FusedMoE, fused_experts, grouped_mm
from piston.models.layers.layernorm import RMSNorm
from piston.models.layers.linear import ParallelLinearBase
from piston.models.layers.quantized import PackedWeight
from piston.models.layers.rotary_embedding import RotaryEmbedding
from piston.models.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from piston.models.llama import LlamaMLP
from torch import nn

from piston_cpu.packed_weights import MAX_ROWS as MAX_PACKED_GEMM_ROWS
from piston_cpu.packed_weights import PackedSlot, PackedWeights
from piston_cpu.reused_output import LARGE_BYTES, ReusedOutput

logger = logging.getLogger(__name__.replace("piston_cpu", "piston.cpu", 1))

# Up to this many rows, the kernel's one pass over each weight row beats torch's GEMM on
# the model's matrices; bigger steps go to torch's blocked GEMM. The kernel keeps a block
# of 8 weight rows in L1 while it passes over the rows of x, which holds up to about 1024
# inputs (32 KiB): past that (a down projection's 1536) the block spills to L2 for every
# row of x and torch wins from 16 rows on. Measured kernel/torch time, 30 distinct
# matrices streamed, 2 threads (python benchmarks/linear_dispatch.py), on an AVX2 CPU
# (AMD Zen 3), where torch's GEMM runs 8-wide too:
#   K=576,  N=960:  0.28 at 1 row, 0.58 at 8, 0.75 at 32, 0.86 at 64, 0.96 at 128, 1.02 at 256
#   K=1536, N=576:  0.51 at 1 row, 0.72 at 8, 1.03 at 16, 1.31 at 32, 1.60 at 64, 1.92 at 256
# Where torch's GEMM runs 16-wide (AVX-512: torch.backends.cpu.get_cpu_capability() says
# so), the AVX2 kernel is ahead only for a few rows (2-core Xeon, same benchmark):
#   K=576,  N=960:  0.70 at 1 row, 0.90 at 8, 1.10 at 12, 1.23 at 16, 1.47 at 64
#   K=576,  N=3072: 0.83 at 1 row, 0.62 at 8, 0.56 at 12, 1.14 at 16, 1.63 at 64
#   K=1536, N=576:  0.86 at 1 row, 1.17 at 8, 1.43 at 16, 1.93 at 64
MAX_KERNEL_ROWS = 256
LONG_K = 1024
MAX_KERNEL_ROWS_LONG_K = 8
MAX_KERNEL_ROWS_WIDE_GEMM = 12  # torch's GEMM is AVX-512: short inputs
MAX_KERNEL_ROWS_WIDE_GEMM_LONG_K = 4


def torch_gemm_is_wide() -> bool:
    """Whether torch's CPU kernels run 16-wide (AVX-512) here, so that its GEMM overtakes
    the 8-wide C++ linear after a few rows."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def kernel_rows(in_features: int, wide_gemm: bool | None = None) -> int:
    """The most rows of x the C++ linear takes for a weight with ``in_features`` inputs."""
    if wide_gemm if wide_gemm is not None else torch_gemm_is_wide():
        return MAX_KERNEL_ROWS_WIDE_GEMM_LONG_K if in_features > LONG_K else MAX_KERNEL_ROWS_WIDE_GEMM
    return MAX_KERNEL_ROWS_LONG_K if in_features > LONG_K else MAX_KERNEL_ROWS


def make_linear(ops: ModuleType, wide_gemm: bool | None = None, slot: PackedSlot | None = None,
                large: ReusedOutput | None = None):
    """The float32 linear: when the layer's weight has a packed copy (``slot``,
    packed_weights.py), the packed GEMM up to packed_weights.MAX_ROWS rows of x; else the
    row-streaming C++ kernel up to kernel_rows() rows; torch's GEMM past them (``wide_gemm``:
    whether torch's GEMM is AVX-512; default: ask torch). Results of LARGE_BYTES or more (the logits) go
    into a buffer kept from call to call when nothing holds the last one (``large``,
    reused_output; one per model is enough)."""
    kernel, packed_linear = ops.linear, getattr(ops, "packed_linear", None)
    short_rows, long_rows = kernel_rows(LONG_K, wide_gemm), kernel_rows(LONG_K + 1, wide_gemm)
    large = ReusedOutput() if large is None else large

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2 and x.stride(1) == 1 and x.dtype == torch.float32:
            rows = x.shape[0]
            packed = None if slot is None or rows > MAX_PACKED_GEMM_ROWS else slot.current(weight)
            if packed is not None:
                n = slot.out_features
                out = large.take(rows, n) if rows * n * 4 >= LARGE_BYTES else None
                return packed_linear(x, packed, n, bias, out)
            if rows <= (long_rows if x.shape[1] > LONG_K else short_rows):
                return kernel(x, weight, bias)
        if (x.dim() == 2 and bias is None and x.shape[0] * weight.shape[0] * 4 >= LARGE_BYTES
                and x.dtype == torch.float32 and weight.dtype == torch.float32):
            out = large.take(x.shape[0], weight.shape[0])
            if out is not None:
                return torch.mm(x, weight.t(), out=out)
        return F.linear(x, weight, bias)

    linear.packed_slot = slot
    return linear


def make_argmax(ops: ModuleType):
    """The sampler's argmax through the C++ kernel (6x torch's at 256 rows of a 49k
    vocabulary: 1.5 against 9.8 ms), for the float32 matrices it takes."""
    kernel = ops.argmax_rows

    def argmax(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32 and x.stride(1) == 1 and x.shape[1] > 0:
            return kernel(x)
        return x.argmax(dim=-1)

    return argmax


def kernel_takes(packed: PackedWeight) -> bool:
    """Whether the C++ kernels decode this packed weight (rows of whole 32-value chunks)."""
    return packed.in_features % 32 == 0 and packed.loaded and all(s.is_contiguous() for s in packed.segments)


def int8_activations() -> bool:
    """PISTON_CPU_QUANT_ACTIVATIONS=int8: the register path (up to 8 rows of x) quantizes x
    to int8 per 32 values for the 32-value formats, as llama.cpp does (quant_int8x.h; with
    AVX512_VNNI, quant_int8x512.h). Off
    by default: it moves SmolLM2's logprobs by up to about 0.5."""
    setting = os.environ.get("PISTON_CPU_QUANT_ACTIVATIONS", "").lower()
    if setting not in ("", "0", "none", "float32", "int8"):
        raise ValueError(f"PISTON_CPU_QUANT_ACTIVATIONS={setting!r}: use int8, or leave it unset.")
    return setting == "int8"


def make_qlinear(ops: ModuleType, quantize_activations: bool = False):
    """The packed linear: the C++ kernel for every batch (quant_kernels.cpp: the register
    path up to 8 rows of x, tiles decoded in L1 below 192, blocks decoded into the packed
    GEMM's layout from there on; the weight is never decoded whole)."""
    qlinear = ops.qlinear

    def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2 or x.stride(1) != 1 or x.dtype != torch.float32:  # the kernels take these only
            flat = x.reshape(-1, x.shape[-1]).float().contiguous()
            out = linear(flat, packed, None if bias is None else bias.float())
            return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
        return qlinear(x, packed.segments, packed.codes, bias, quantize_activations)

    return linear


def make_qembedding(ops: ModuleType):
    qembedding, qdequantize = ops.qembedding, ops.qdequantize

    def embedding(ids: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        flat = ids.reshape(-1).contiguous().to(torch.int64)
        if len(packed.segments) == 1:
            rows = qembedding(flat, packed.segments[0], packed.codes[0], packed.in_features)
        else:
            rows = qdequantize(packed.segments, packed.codes, packed.in_features)[flat]
        return rows.to(packed.dtype).view(*ids.shape, packed.in_features)

    return embedding


def make_rms_norm(ops: ModuleType):
    kernel = ops.rms_norm

    def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
        # The kernel returns (out, None) without a residual.
        if x.dim() == 2 and x.stride(1) == 1:
            return kernel(x, residual, weight, eps)
        shape = x.shape  # q/k norms see [tokens, heads, head_dim]
        r2 = None if residual is None else residual.reshape(-1, shape[-1])
        out, summed = kernel(x.reshape(-1, shape[-1]), r2, weight, eps)
        return out.view(shape), (None if summed is None else summed.view(shape))

    return rms_norm


# The C++ grouped GEMM of the experts (moe_kernels.cpp) streams each expert's weights once
# for its rows; torch's grouped GEMM runs a blocked GEMM per expert, ahead from about 16 rows
# per expert on. torch/C++ time of both expert GEMMs, 8 experts, hidden 1024, width 1408:
#   1 thread:  2.4 at 1 row per expert, 1.3 at 4, 1.2 at 8, 0.94 at 16, 0.80 at 32
#   2 threads: 4.2 at 2 rows per expert, 2.7 at 4, 2.1 at 8, 1.5 at 16, 1.3 at 32, 1.1 at 64
MAX_MOE_KERNEL_ROWS = 16


def make_fused_moe(ops: ModuleType):
    """The experts of a FusedMoE layer through the C++ grouped GEMM and SiLU-and-mul while
    every expert has at most MAX_MOE_KERNEL_ROWS rows (a decode step), else torch's."""
    grouped, silu_and_mul = ops.moe_grouped_linear, ops.silu_and_mul

    def mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.stride(1) == 1 and w.is_contiguous() and \
                int(torch.diff(ends, prepend=ends.new_zeros(1)).max()) <= MAX_MOE_KERNEL_ROWS:
            return grouped(x, w, ends)
        return grouped_mm(x, w, ends)

    def fused_moe(x, w13, w2, topk_weights, topk_ids):
        return fused_experts(x, w13, w2, topk_weights, topk_ids, mm=mm, act_and_mul=silu_and_mul)

    return fused_moe


def install(model: nn.Module, ops: ModuleType, packed: PackedWeights | None = None) -> int:
    """Sets the kernels on every layer of ``model`` they apply to; returns how many. With
    ``packed``, each float32 linear gets a slot there for a packed copy of its weight (made
    by ``packed.pack()``, which the caller runs after this)."""
    large = ReusedOutput()
    linear, rms_norm = make_linear(ops, large=large), make_rms_norm(ops)
    # An embedding projects the logits only where the model has no separate head (tied
    # weights): only then is its weight worth a packed copy.
    tied = not any(isinstance(m, ParallelLMHead) for m in model.modules())
    qlinear, qembedding = make_qlinear(ops, int8_activations()), make_qembedding(ops)
    count = 0
    for module in model.modules():
        if isinstance(module, (ParallelLinearBase, VocabParallelEmbedding)) and module.qweight is not None:
            if kernel_takes(module.qweight):
                module.qkernel = qlinear
                if isinstance(module, VocabParallelEmbedding):
                    module.qembed_kernel = qembedding
                count += 1
        elif isinstance(module, (ParallelLinearBase, VocabParallelEmbedding)):
            if module.weight.dtype == torch.float32 and module.weight.is_contiguous():
                wanted = packed is not None and (isinstance(module, (ParallelLinearBase, ParallelLMHead)) or tied)
                slot = packed.slot(module) if wanted else None
                module.kernel = linear if slot is None else make_linear(ops, slot=slot, large=large)
                count += 1
        elif isinstance(module, RMSNorm):
            module.kernel = rms_norm
            count += 1
        elif isinstance(module, RotaryEmbedding):
            if module.cos_sin_cache.dtype == torch.float32 and module.cos_sin_cache.is_contiguous():
                module.kernel = ops.rotary_neox
                count += 1
        elif isinstance(module, LlamaMLP) and module.act_name == "silu":
            module.act_and_mul_kernel = ops.silu_and_mul
            count += 1
        elif isinstance(module, FusedMoE) and module.w13.weight.dtype == torch.float32:
            module.kernel = make_fused_moe(ops)
            count += 1
    return count


def install_lora(ops: ModuleType) -> None:
    """The C++ SGMV kernel for every LoRA layer (piston.models.layers.lora): one call per
    layer serves all of a step's adapters."""
    from piston.models.layers.lora import LoRAStack

    sgmv = ops.lora_sgmv

    def lora_kernel(stack, x: torch.Tensor, y: torch.Tensor, mapping) -> None:
        if x.dtype != torch.float32 or x.stride(-1) != 1 or y.stride(-1) != 1:
            return LoRAStack.torch_delta(stack, x, y, mapping)
        sgmv(x, y, stack.lora_a, stack.lora_b, mapping.token_ids, mapping.slot_ends, stack.slice_bounds)

    LoRAStack.kernel = staticmethod(lora_kernel)

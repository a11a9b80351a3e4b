"""Triton kernels of the CUDA platform: KV-cache writes, paged attention, state merges, and the
dequant-GEMM of packed (quantized) weights.

Each module holds one kernel family and its launcher. They import Triton at module level,
so import them only where Triton is installed (the attention backends do it lazily).
"""

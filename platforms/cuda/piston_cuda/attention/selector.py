"""Choose the CUDA attention backend: ``flash_attn`` when installed and able, else ``triton``.

``PISTON_ATTENTION_BACKEND=flash_attn|triton`` overrides the choice; naming a backend
that cannot run is an error that says why. The choice is logged once at start-up.
"""

from __future__ import annotations

import logging
import os

import torch

from piston_cuda.attention.flash_attention import FlashAttnLibrary, detect_flash_attn, unsupported_reason
from piston_cuda.attention.metadata import CudaAttentionBackend

logger = logging.getLogger(__name__.replace("piston_cuda", "piston.cuda", 1))

ENV_VAR = "PISTON_ATTENTION_BACKEND"
BACKENDS = ("flash_attn", "triton")


def select_attention_backend(dtype: torch.dtype, block_size: int, head_dim: int,
                             capability: tuple[int, int] | None, requested: str | None = None,
                             kv_dtype: torch.dtype | None = None) -> tuple[str, FlashAttnLibrary | None, str]:
    """``(name, flash-attn library or None, why)`` for this model and cache (``kv_dtype``:
    the cache's dtype, default the model's; flash-attn reads only a cache of the model's).

    ``requested`` (default: ``$PISTON_ATTENTION_BACKEND``) forces a backend; raises
    ValueError for an unknown name or a flash_attn request that cannot be met.
    """
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={requested!r} is not a CUDA attention backend; use one of "
                         f"{', '.join(BACKENDS)} (or unset it for the automatic choice).")
    if requested == "triton":
        return "triton", None, f"{ENV_VAR}=triton"
    lib = detect_flash_attn(capability)
    reason = "flash-attn is not installed" if lib is None else unsupported_reason(lib, dtype, block_size, head_dim)
    if reason is None and kv_dtype is not None and kv_dtype != dtype:
        reason = (f"{lib.label} reads a KV cache of the model's dtype only (the cache holds "
                  f"{str(kv_dtype).removeprefix('torch.')})")
    if reason is None:
        why = f"{ENV_VAR}=flash_attn" if requested else "installed and supports this model"
        return "flash_attn", lib, f"{lib.label}, {why}"
    if requested == "flash_attn":
        raise ValueError(f"{ENV_VAR}=flash_attn, but {reason}. Install flash-attn for this GPU and "
                         f"settings, or use {ENV_VAR}=triton.")
    return "triton", None, f"default: {reason}"


def make_attention_backend(dtype: torch.dtype, block_size: int, num_heads: int, num_kv_heads: int,
                           head_dim: int, device: torch.device | None = None,
                           use_cascade: bool = True, kv_dtype: torch.dtype | None = None) -> CudaAttentionBackend:
    """The selected backend for this rank's heads on ``device`` (None: no GPU facts, for tests)."""
    capability = num_sms = None
    if device is not None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    name, lib, why = select_attention_backend(dtype, block_size, head_dim, capability, kv_dtype=kv_dtype)
    logger.info("CUDA attention backend: %s (%s).", name, why)
    if name == "flash_attn":
        from piston_cuda.attention.flash_attention import FlashAttention

        return FlashAttention(lib, num_heads, num_kv_heads, head_dim, num_sms or 0, use_cascade)
    from piston_cuda.attention.triton_attention import TritonAttention

    return TritonAttention(num_heads, num_kv_heads, head_dim, num_sms or 0, use_cascade)

"""CudaPlatform: runs the shared torch models on NVIDIA GPUs.

Importing this module needs nothing beyond the standard library; torch and Triton are
imported when asked, so a CPU-only machine lists the platform as unavailable with a
reason instead of failing.
"""

from __future__ import annotations

import logging

from piston.hal.interface import Platform

logger = logging.getLogger(__name__.replace("piston_cuda", "piston.cuda", 1))

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# The Triton kernels tile keys in steps of 16; FlashAttention's paged layouts want the same.
BLOCK_SIZE_MULTIPLE = 16


class CudaPlatform(Platform):
    name = "cuda"
    supports_kv_offload = True
    supports_speculative = True
    draft_methods = ("draft_model", "eagle", "eagle3")
    supports_lora = True
    kv_cache_dtypes = ("float32", "float16", "bfloat16")

    @classmethod
    def is_available(cls) -> bool:
        return cls._why_unavailable() is None

    @classmethod
    def _why_unavailable(cls) -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed (pip install 'piston[cuda]')"
        try:
            if torch.version.cuda is None:
                return (f"this torch ({torch.__version__}) is a build without CUDA; install a CUDA "
                        "build of torch (pip install 'piston[cuda]' with a CUDA wheel index)")
            if not torch.cuda.is_available():
                return "no CUDA device is visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)"
        except Exception as e:  # a broken driver must not break platform discovery
            return f"CUDA could not be initialized ({type(e).__name__}: {e})"
        return None

    @classmethod
    def unavailable_reason(cls) -> str:
        return cls._why_unavailable() or "available"

    @classmethod
    def device_name(cls) -> str:
        import torch

        return f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"

    @classmethod
    def total_memory(cls) -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    @classmethod
    def available_memory(cls) -> int:
        """Free bytes on device 0 right now (all processes counted)."""
        import torch

        return torch.cuda.mem_get_info(0)[0]

    @classmethod
    def check_and_update_config(cls, config) -> None:
        import torch

        dtype = config.model_config.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported on CUDA; use one of {SUPPORTED_DTYPES}.")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(0)} has no bfloat16 support; use --dtype float16.")
        block_size = config.cache_config.block_size
        if block_size % BLOCK_SIZE_MULTIPLE:
            raise ValueError(f"block_size={block_size} is not supported on CUDA; use a multiple of "
                             f"{BLOCK_SIZE_MULTIPLE} (16 is the default).")
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ValueError("The CUDA platform needs Triton for its attention kernels: "
                             "pip install 'piston[cuda]' (or pip install triton).") from e

    @classmethod
    def distributed_backend(cls) -> str:
        return "nccl"

    @classmethod
    def ray_resource(cls) -> str:
        return "GPU"

    @classmethod
    def make_worker(cls, config, rank=0, world_size=1):
        from piston_cuda.worker import CudaWorker

        return CudaWorker(config, rank, world_size)

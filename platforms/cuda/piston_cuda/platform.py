"""CudaPlatform: registered, but reports itself unavailable until its runner exists."""

from __future__ import annotations

from piston.platforms.interface import Platform


class CudaPlatform(Platform):
    name = "cuda"

    @classmethod
    def is_available(cls) -> bool:
        # The CUDA worker (Triton / FlashAttention backends) is not implemented yet.
        return False

    @classmethod
    def unavailable_reason(cls) -> str:
        return "the CUDA model runner is not implemented yet in this release"

    @classmethod
    def device_name(cls) -> str:
        return "NVIDIA GPU"

    @classmethod
    def total_memory(cls) -> int:
        return 0

    @classmethod
    def distributed_backend(cls) -> str:
        return "nccl"

    @classmethod
    def make_worker(cls, config, rank=0, world_size=1):
        raise NotImplementedError(cls.unavailable_reason())

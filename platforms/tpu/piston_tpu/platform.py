"""TpuPlatform: JAX + Pallas. Runs on Google TPUs, and on JAX's CPU backend for testing.

Available when JAX is installed and this host has TPU chips (libtpu plus /dev/accel* or
/dev/vfio devices; detected without initializing JAX, since a TPU opened by one process
is locked for the others, and the engine's worker process must be the one to open it).
With ``PISTON_PLATFORM=tpu`` on a host without a TPU it runs on JAX's CPU backend with
the Pallas kernel in interpret mode, and says once that this is for testing only.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

from piston.hal.interface import Platform

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))

# KV cache memory on JAX's CPU backend when the user gives none (as the CPU platform).
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def jax_installed() -> bool:
    return importlib.util.find_spec("jax") is not None


def tpu_present() -> bool:
    """True when this host has TPU chips that libtpu can drive (no JAX initialization)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def cpu_fallback_requested() -> bool:
    return os.environ.get("PISTON_PLATFORM", "").strip().lower() == "tpu"


def select_jax_backend() -> bool:
    """Whether this host has a TPU; without one JAX is pointed at its CPU backend. Call it
    before JAX is imported (JAX reads JAX_PLATFORMS then): never probe for accelerators a
    test machine may have."""
    if tpu_present():
        return True
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return False


def check_architecture(model_config) -> None:
    """ValueError unless the JAX models run ``model_config``'s architecture: the transformers
    fallback (model_impl "transformers", or "auto" for an architecture Piston has no model
    of) is torch code, which this platform does not run."""
    if model_config.model_impl == "transformers":
        raise ValueError("model_impl='transformers': the transformers fallback is torch-only (CPU and CUDA "
                         "platforms); the TPU platform runs Piston's own JAX models (model_impl auto or piston).")
    select_jax_backend()
    from piston_tpu.model import SUPPORTED_ARCHITECTURES

    names = model_config.architectures
    if not any(name in SUPPORTED_ARCHITECTURES for name in names):
        raise ValueError(f"Model architecture {names or '(none given)'} is not supported on the TPU platform; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. The transformers fallback, which runs "
                         "other architectures, is torch-only: serve this model with PISTON_PLATFORM=cpu or cuda.")


class TpuPlatform(Platform):
    name = "tpu"
    # One chip per engine so far: a JAX-mesh tensor-parallel runner is future work.
    supports_tensor_parallel = False
    supports_speculative = True
    draft_methods = ("draft_model", "eagle", "eagle3")
    # Adapter slots stacked in the JAX parameters (piston_tpu.lora); one chip, so nothing to shard.
    supports_lora = True
    kv_cache_dtypes = ("float32", "float16", "bfloat16")

    @classmethod
    def is_available(cls) -> bool:
        if not jax_installed():
            return False
        return tpu_present() or cpu_fallback_requested()

    @classmethod
    def unavailable_reason(cls) -> str:
        if not jax_installed():
            return "JAX is not installed (pip install 'piston[tpu]'; a TPU host also needs jax[tpu])"
        return ("no TPU on this host; set PISTON_PLATFORM=tpu to run the TPU platform on JAX's CPU "
                "backend (for testing)")

    @classmethod
    def device_name(cls) -> str:
        if not tpu_present():
            return "JAX CPU backend (TPU platform test mode)"
        kind = os.environ.get("TPU_ACCELERATOR_TYPE")
        chips = len(glob.glob("/dev/accel*")) or len(glob.glob("/dev/vfio/[0-9]*"))
        return f"Google TPU {kind or ''} ({chips} chips)".replace("  ", " ")

    @classmethod
    def total_memory(cls) -> int:
        if not tpu_present():
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return int(stats.get("bytes_limit", 0))

    @classmethod
    def check_and_update_config(cls, config) -> None:
        dtype = config.model_config.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported on the TPU platform; use one of {SUPPORTED_DTYPES}.")
        if config.parallel_config.tensor_parallel_size != 1:  # the engine checks first; kept for direct callers
            raise ValueError(f"tensor_parallel_size={config.parallel_config.tensor_parallel_size}: the TPU "
                             "platform runs one chip per engine so far; use tensor_parallel_size=1.")
        if config.cache_config.kv_cache_memory is None and not tpu_present():
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            config.cache_config.kv_cache_memory = min(DEFAULT_CPU_KV_CACHE_BYTES, avail // 4)
        check_architecture(config.model_config)

    @classmethod
    def distributed_backend(cls) -> str:
        return "jax"

    @classmethod
    def ray_resource(cls) -> str:
        return "TPU"

    @classmethod
    def make_worker(cls, config, rank=0, world_size=1):
        on_tpu = select_jax_backend()
        if not on_tpu:
            logger.warning("TPU platform: no TPU on this host, running on JAX's CPU backend (Pallas kernels in "
                           "interpret mode). This is for testing only; serve on a CPU with PISTON_PLATFORM=cpu.")
        from piston_tpu.worker import TpuWorker

        return TpuWorker(config, rank, world_size, on_tpu=on_tpu)

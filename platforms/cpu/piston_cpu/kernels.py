"""Piston's C++ CPU kernels (``csrc/cpu_kernels.cpp``): built on first use, cached on disk.

``load()`` returns the compiled module, or None, after logging why, when it cannot be
used: ``PISTON_CPU_KERNELS=0``, a CPU without AVX2 and FMA, or no working C++ compiler.
The first build takes about 20 s and is cached (keyed by the source and torch version)
under ``$PISTON_CACHE_DIR/cpu_kernels``, default ``~/.cache/piston/cpu_kernels``;
later starts load the cached library in well under a second. Every caller keeps a
torch fallback, so the kernels change speed, never results beyond float rounding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None when they can be built."""
    if os.environ.get("PISTON_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return "disabled by PISTON_CPU_KERNELS=0"
    if os.uname().machine not in ("x86_64", "AMD64"):
        return f"they are written for x86-64 with AVX2; this machine is {os.uname().machine}"
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    return None


def build_dir() -> Path:
    base = Path(os.environ.get("PISTON_CACHE_DIR", Path.home() / ".cache" / "piston"))
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    return base / "cpu_kernels" / digest


def load() -> ModuleType | None:
    """The compiled kernels, or None (the reason logged once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        module = None
        reason = unavailable_reason()
        if reason is None:
            try:
                module = _build()
            except Exception as e:  # no compiler, no headers, a failed compile ...
                reason = f"building {SOURCE.name} failed: {str(e).strip().splitlines()[-1] if str(e) else e!r}"
        if module is None:
            logger.warning("Piston's CPU kernels are not used (%s); running torch's kernels instead, "
                           "which are slower at small batches.", reason)
        _state["module"] = module
        return module


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    cached = any(directory.glob("*.so"))
    if not cached:
        logger.info("Building Piston's CPU kernels (once per machine and torch version, about 20 s) in %s",
                    directory)
    start = time.perf_counter()
    flags = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]
    module = load_extension("piston_cpu_kernels", [str(SOURCE)], extra_cflags=flags,
                            extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    logger.info("Piston's CPU kernels %s in %.1f s.", "loaded" if cached else "built", time.perf_counter() - start)
    return module

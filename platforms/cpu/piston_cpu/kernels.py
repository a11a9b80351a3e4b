"""Piston's C++ CPU kernels (``csrc/``): built on first use, cached on disk.

``cpu_kernels.cpp`` holds the float32 kernels, ``quant_kernels.cpp`` those for packed
(quantized) weights, ``decoder_stack.cpp`` a Llama-family model's layers as one call of
them (with the LoRA and MoE kernels, all compile into one extension). ``load()`` returns the compiled
module, or None, after logging why, when it cannot be
used: ``PISTON_CPU_KERNELS=0``, a CPU without AVX2 and FMA, no C++ compiler or ninja
(``pip install ninja``), or a failed build. The first build takes about a minute and is
cached (keyed by the source, the flags and the torch version) under
``$PISTON_CACHE_DIR/cpu_kernels``, default ``~/.cache/piston/cpu_kernels``; later starts
import the cached library directly, in milliseconds. Every caller keeps a
torch fallback, so the kernels change speed, never results beyond float rounding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__.replace("piston_cpu", "piston.cpu", 1))

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "cpu_kernels.cpp"
SOURCES = [SOURCE, CSRC / "quant_kernels.cpp", CSRC / "lora_kernels.cpp", CSRC / "moe_kernels.cpp",
           CSRC / "decoder_stack.cpp", CSRC / "packed_gemm.cpp", CSRC / "greedy_head.cpp"]
HEADERS = sorted(CSRC.glob("*.h"))
NAME = "piston_cpu_kernels"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
# Added where the CPU has them (and PISTON_CPU_ISA is not avx2): the kernels' AVX-512
# variants (quant_gemv512.h) are compiled in. The cache key includes the flags.
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
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


def isa() -> str:
    """The instruction set the kernels are built for here: "avx512" where the CPU has
    AVX512F, BW, VL and DQ, else "avx2". ``PISTON_CPU_ISA=avx2`` forces the 8-wide build
    (to compare the two on one machine)."""
    setting = os.environ.get("PISTON_CPU_ISA", "").lower()
    if setting not in ("", "auto", "avx2", "avx512"):
        raise ValueError(f"PISTON_CPU_ISA={setting!r}: use avx2 or avx512, or leave it unset.")
    wide = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags()
    if setting == "avx512" and not wide:
        raise ValueError("PISTON_CPU_ISA=avx512, but this CPU lacks AVX512F/BW/VL/DQ.")
    return "avx512" if wide and setting != "avx2" else "avx2"


def cflags() -> list[str]:
    if isa() != "avx512":
        return CFLAGS
    # VNNI's integer dot products serve the opt-in int8 activations (quant_int8x512.h).
    return CFLAGS + AVX512_FLAGS + (["-mavx512vnni"] if "avx512_vnni" in cpu_flags() else [])


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None when they can be built."""
    setting = os.environ.get("PISTON_CPU_KERNELS", "1")
    if setting.lower() in ("0", "false", "no", "off"):
        return f"disabled by PISTON_CPU_KERNELS={setting}"
    if os.uname().machine not in ("x86_64", "AMD64"):
        return f"they are written for x86-64 with AVX2; this machine is {os.uname().machine}"
    missing = {"avx2", "fma"} - cpu_flags()  # every CPU with both has F16C (-mf16c) too
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    if any(build_dir().glob(f"{NAME}*.so")):
        return None  # built before: no compiler needed
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    if _find_ninja() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def _find_ninja() -> str | None:
    """ninja on PATH, or the one pip installed next to this Python (then put on PATH,
    where torch's extension builder looks)."""
    found = shutil.which("ninja")
    if found is None:
        beside = Path(sys.executable).parent / "ninja"
        if beside.exists():
            os.environ["PATH"] = f"{beside.parent}{os.pathsep}{os.environ.get('PATH', '')}"
            found = str(beside)
    return found


def build_dir() -> Path:
    base = Path(os.environ.get("PISTON_CACHE_DIR", Path.home() / ".cache" / "piston"))
    key = b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(cflags()).encode() + torch.__version__.encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
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
                detail = str(e).strip().splitlines()[-1] if str(e) else repr(e)
                reason = f"building {', '.join(p.name for p in SOURCES)} failed: {detail}"
        if module is None:
            logger.warning("Piston's CPU kernels are not used (%s); running torch's kernels instead, "
                           "which are slower at small batches.", reason)
        _state["module"] = module
        return module


def _build() -> ModuleType:
    directory = build_dir()
    built = sorted(directory.glob(f"{NAME}*.so"))
    start = time.perf_counter()
    # The directory is keyed by source, flags and torch, so a library there is current
    # unless another process is still building it (torch's builder holds "lock").
    if built and not (directory / "lock").exists():
        spec = importlib.util.spec_from_file_location(NAME, built[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        logger.info("Piston's CPU kernels (%s) loaded from %s in %.2f s.", isa(), built[0], time.perf_counter() - start)
        return module

    from torch.utils.cpp_extension import load as load_extension

    directory.mkdir(parents=True, exist_ok=True)
    logger.info("Building Piston's CPU kernels for %s (once per machine and torch version, about a minute) in %s",
                isa(), directory)
    module = load_extension(NAME, [str(p) for p in SOURCES], extra_cflags=cflags(), extra_ldflags=["-fopenmp"],
                            build_directory=str(directory), verbose=False)
    logger.info("Piston's CPU kernels built in %.1f s.", time.perf_counter() - start)
    return module

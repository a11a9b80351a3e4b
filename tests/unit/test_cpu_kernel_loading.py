"""How the CPU platform decides whether Piston's C++ kernels can be used, and the fallback."""

import logging
import os

import pytest

from piston_cpu import kernels


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PISTON_CPU_KERNELS", "0")
    assert kernels.unavailable_reason() == "disabled by PISTON_CPU_KERNELS=0"


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="the checks after the architecture one")
def test_missing_cpu_features_and_compiler_are_named(monkeypatch, tmp_path):
    monkeypatch.delenv("PISTON_CPU_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse2", "avx"})
    assert kernels.unavailable_reason() == "this CPU lacks avx2, fma"
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("PISTON_CACHE_DIR", str(tmp_path))  # nothing built there: a compiler is needed
    monkeypatch.setenv("CXX", "no-such-compiler-for-piston")
    assert kernels.unavailable_reason() == "no C++ compiler ('no-such-compiler-for-piston' is not on PATH; set CXX)"


def test_load_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("PISTON_CPU_KERNELS", "off")
    with caplog.at_level(logging.WARNING, logger="piston.cpu.kernels"):
        assert kernels.load() is None
        assert kernels.load() is None  # decided once per process
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PISTON_CPU_KERNELS=off" in warnings[0] and "torch's kernels" in warnings[0]


def test_avx512_build_follows_the_cpu_and_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv("PISTON_CPU_ISA", raising=False)
    monkeypatch.setenv("PISTON_CACHE_DIR", str(tmp_path))
    wide = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    monkeypatch.setattr(kernels, "cpu_flags", lambda: wide)
    assert kernels.isa() == "avx512" and set(kernels.AVX512_FLAGS) <= set(kernels.cflags())
    avx512_dir = kernels.build_dir()
    monkeypatch.setenv("PISTON_CPU_ISA", "avx2")  # forced 8-wide: its own cached library
    assert kernels.isa() == "avx2" and not set(kernels.AVX512_FLAGS) & set(kernels.cflags())
    assert kernels.build_dir() != avx512_dir
    monkeypatch.delenv("PISTON_CPU_ISA")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: wide - {"avx512vl"})  # AVX512F alone is not enough
    assert kernels.isa() == "avx2"
    monkeypatch.setenv("PISTON_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="lacks AVX512F/BW/VL/DQ"):
        kernels.isa()
    monkeypatch.setenv("PISTON_CPU_ISA", "sse")
    with pytest.raises(ValueError, match="use avx2 or avx512"):
        kernels.isa()

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

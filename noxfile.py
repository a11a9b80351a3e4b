"""Nox sessions: lint, tests (unit), kernels-cuda-interpret, distributed, conformance-<platform>, bench,
slow (the tests marked slow), quant-accuracy and bench-quant.

Every install passes `-c constraints.txt`: an unpinned torch pulls a multi-GB CUDA build.
Sessions use the interpreter nox runs under and reuse their virtualenvs between runs. The
`reference` extra (torch) is the transformers reference the tests compare against; the TPU
session has no torch and runs the reference in another interpreter.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests", "kernels-cuda-interpret", "conformance-cpu", "e2e"]

ROOT = Path(__file__).parent


def _install(session: nox.Session, extras: str = "cpu,dev,reference") -> None:
    session.install("-c", "constraints.txt", "-e", f".[{extras}]")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check over the whole repository."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests: core logic, no model needed."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/unit", "-q", *session.posargs)


@nox.session(name="kernels-cuda-interpret")
def kernels_cuda_interpret(session: nox.Session) -> None:
    """The CUDA platform's Triton kernels on the CPU through Triton's interpreter (float32, float16)."""
    _install(session, "cpu,cuda,dev,reference")
    session.run("python", "-m", "pytest", "tests/kernels", "-q", *session.posargs,
                env={"TRITON_INTERPRET": "1"})


@nox.session
def distributed(session: nox.Session) -> None:
    """Tensor parallelism on the CPU (gloo, TP=2): the mp executor and the Ray executor."""
    _install(session, "cpu,dev,reference,ray")
    session.run("python", "-m", "pytest", "tests/unit/test_tp_workers.py",
                "tests/unit/test_ray_executor.py", "tests/conformance/test_tensor_parallel.py", "-q",
                *session.posargs, env={"PISTON_PLATFORM": "cpu"})


@nox.session
def e2e(session: nox.Session) -> None:
    """The OpenAI server end to end, driven by the official openai client."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/e2e", "-q", *session.posargs,
                env={"PISTON_PLATFORM": "cpu"})


def _conformance(session: nox.Session, platform: str, extras: str) -> None:
    _install(session, extras)
    session.run(
        "python", "-m", "pytest", "tests/conformance", "-q", *session.posargs,
        env={"PISTON_PLATFORM": platform},
    )


def _reference_python(session: nox.Session) -> str:
    """An interpreter with torch and transformers for the reference: $PISTON_REFERENCE_PYTHON,
    else .venv's (bash ci/test.sh makes it), else a venv built here once."""
    given = os.environ.get("PISTON_REFERENCE_PYTHON")
    if given:
        return given
    for python in (ROOT / ".venv" / "bin" / "python", ROOT / ".nox" / "reference" / "bin" / "python"):
        if python.exists() and subprocess.run([str(python), "-c", "import torch, transformers"],
                                              capture_output=True).returncode == 0:
            return str(python)
    folder = ROOT / ".nox" / "reference"
    session.run("python", "-m", "venv", str(folder))
    session.run(str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "-c", "constraints.txt",
                "-e", ".[dev,reference]", external=True)
    return str(folder / "bin" / "python")


@nox.session(name="conformance-cpu")
def conformance_cpu(session: nox.Session) -> None:
    """The conformance suite on the CPU platform."""
    _conformance(session, "cpu", "cpu,dev,reference")


@nox.session(name="conformance-cuda")
def conformance_cuda(session: nox.Session) -> None:
    """The same suite on CUDA; fails with the platform's error when no GPU is present."""
    _conformance(session, "cuda", "cuda,dev,reference")


@nox.session(name="conformance-tpu")
def conformance_tpu(session: nox.Session) -> None:
    """The same suite on the TPU plugin (JAX), in an environment without torch: it installs
    exactly ``.[tpu,dev]``, checks that torch is absent, and runs the transformers references
    in another interpreter (``_reference_python``). Without a TPU it runs on JAX's CPU backend
    with the Pallas kernel in interpret mode (PISTON_PLATFORM=tpu enables that fallback)."""
    reference = _reference_python(session)
    _install(session, "tpu,dev")
    # A virtualenv reused from before this session went torch-free may still hold torch.
    session.run("python", "-m", "pip", "uninstall", "-q", "-y", "torch", silent=True)
    session.run("python", "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not "
                "None and 'torch is installed in the TPU session; it must run without torch')")
    session.run("python", "-m", "pytest", "tests/conformance", "tests/unit/test_torch_free.py",
                "tests/e2e/test_serve_without_torch.py", "-q",
                *session.posargs, env={"PISTON_PLATFORM": "tpu", "PISTON_REFERENCE_PYTHON": reference})


@nox.session
def soak(session: nox.Session) -> None:
    """The server soak for 10 minutes (PISTON_SOAK_SECONDS; the default suite runs 20 s)."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/e2e/test_soak.py", "-q", "-s", *session.posargs,
                env={"PISTON_PLATFORM": "cpu", "PISTON_SOAK_SECONDS": os.environ.get("PISTON_SOAK_SECONDS", "600")})


@nox.session
def fuzz(session: nox.Session) -> None:
    """schemathesis over the server's OpenAPI schema with 200 examples per operation and phase
    (PISTON_FUZZ_EXAMPLES; the default suite runs 10)."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/e2e/test_openapi_fuzz.py", "-q", "-s", *session.posargs,
                env={"PISTON_PLATFORM": "cpu",
                     "PISTON_FUZZ_EXAMPLES": os.environ.get("PISTON_FUZZ_EXAMPLES", "200")})


@nox.session
def slow(session: nox.Session) -> None:
    """The tests marked slow, left out of the default suite to keep it under 30 minutes:
    on the CPU platform, then on the TPU plugin with its torch-free conformance run."""
    _install(session, "cpu,tpu,dev,reference")
    session.run("python", "-m", "pytest", "tests", "-q", "-m", "slow", "--run-slow", *session.posargs,
                env={"PISTON_PLATFORM": "cpu"})
    session.run("python", "-m", "pytest", "tests/conformance", "-q", "-m", "slow", "--run-slow", *session.posargs,
                env={"PISTON_PLATFORM": "tpu"})


@nox.session(name="quant-accuracy")
def quant_accuracy(session: nox.Session) -> None:
    """SmolLM2's Q4_1 GGUF served packed against transformers on the same file: teacher-forced
    top-1 agreement over about 4000 positions of real text (about a minute; tests/quantized)."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/quantized", "-q", "-s", *session.posargs,
                env={"PISTON_PLATFORM": "cpu"})


@nox.session(name="bench-ttft")
def bench_ttft(session: nox.Session) -> None:
    """Time to first token at 1 and 8 concurrent streams (benchmarks/ttft_concurrency.sh), by
    `piston bench serve` and by guidellm 0.8.1 (installed here, torch pinned), with the CPU's
    prompt cap off (`--max-prefill-tokens 0`, the old scheduling) and on (the default), one
    after the other. Results under $TTFT_OUT (default /tmp/piston-ttft). Run it on an idle machine."""
    _install(session)
    session.install("-c", "constraints.txt", "guidellm==0.8.1")
    out = Path(os.environ.get("TTFT_OUT", "/tmp/piston-ttft"))
    session.run("bash", "benchmarks/ttft_concurrency.sh", str(out / "no-cap"), "--max-prefill-tokens", "0",
                external=True)
    session.run("bash", "benchmarks/ttft_concurrency.sh", str(out / "default"), external=True)


@nox.session(name="bench-quant")
def bench_quant(session: nox.Session) -> None:
    """The quantized-weights figures of benchmarks/RESULTS.md: batch-1 decode against llama.cpp,
    the 64-request workload packed and in float32, and a synthetic 7B Q4_K_M GGUF's memory.

    llama.cpp (llama-cpp-python, built from its sdist) lives in its own virtualenv,
    $LLAMA_VENV (default /tmp/llama-venv), made here on first use; never in Piston's."""
    _install(session)
    venv = Path(os.environ.get("LLAMA_VENV", "/tmp/llama-venv"))
    if not (venv / "bin" / "python").exists():
        session.run("python", "-m", "venv", str(venv))
    if subprocess.run([str(venv / "bin" / "python"), "-c", "import llama_cpp"], capture_output=True).returncode:
        session.run(str(venv / "bin" / "python"), "-m", "pip", "install", "llama-cpp-python", external=True)
    session.run("python", "benchmarks/quant_decode.py", "--llama-python", str(venv / "bin" / "python"),
                "--rounds", "5", "--float32", *session.posargs)
    session.run("bash", "benchmarks/quant_throughput.sh", external=True, env={"PYTHON": "python"})
    session.run("python", "benchmarks/synthetic_q4_k_m.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Piston against transformers on the issue's workload (benchmarks/compare.sh).

    Extra arguments go to `piston bench throughput`. Run it on an idle machine.
    """
    _install(session)
    session.run("bash", "benchmarks/compare.sh", *session.posargs, external=True,
                env={"PYTHON": "python"})

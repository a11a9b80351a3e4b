"""The front end, the engine core and the TPU plugin run without torch.

Each check runs in a fresh interpreter with torch blocked (``sys.modules["torch"] = None``
makes every ``import torch`` fail), so an import that reaches torch anywhere fails here.
The TPU nox session goes further: it installs no torch at all and runs the conformance
suite on the TPU platform.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=300)


def test_blocking_torch_really_blocks_it():
    result = _run("import torch")
    assert result.returncode != 0 and "torch" in result.stderr


def test_front_end_and_core_import_without_torch():
    result = _run(
        "import piston\n"
        "from piston import SamplingParams\n"
        "import piston.entrypoints.openai.api_server, piston.entrypoints.cli, piston.entrypoints.llm\n"
        "import piston.engine.async_llm, piston.engine.llm_engine, piston.engine.core_proc\n"
        "import piston.engine.engine_core, piston.core.scheduler\n"
        "import piston.executor.uniproc, piston.executor.multiproc, piston.executor.worker_proc\n"
        "import piston.step.model_runner, piston.checkpoint.checkpoint_reader, piston.hal.registry\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tpu_plugin_imports_without_torch():
    pytest.importorskip("jax")
    result = _run(
        "import piston_tpu.platform, piston_tpu.worker, piston_tpu.model_runner, piston_tpu.weights\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cpu_and_cuda_platforms_report_themselves_unavailable_without_torch():
    result = _run(
        "from piston_cpu.platform import CpuPlatform\n"
        "from piston_cuda.platform import CudaPlatform\n"
        "print(CpuPlatform.is_available(), CudaPlatform.is_available())\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"


def test_engine_config_travels_without_torch(smollm2_path):
    result = _run(
        "from piston.engine.arg_utils import EngineArgs\n"
        "from piston.step.config_codec import decode_engine_config, encode_engine_config\n"
        f"config = EngineArgs(model={smollm2_path!r}, max_model_len=256).create_engine_config()\n"
        "again = decode_engine_config(encode_engine_config(config))\n"
        "mc = again.model_config\n"
        "print(mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.max_model_len)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["30", "3", "64", "256"]

"""`schemathesis run --checks all` over the server's own /openapi.json, against the tiny model.

Every check schemathesis has: no 5xx, every status and body as documented, schema-valid
requests accepted (except the context rule, see schemathesis_hooks.py), schema-violating
ones rejected, auth enforced. Bounded by PISTON_FUZZ_EXAMPLES examples per operation and
phase (default 10: under a minute here); `nox -s fuzz` runs 200.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARGS, ServerProcess

HERE = Path(__file__).parent
EXAMPLES = int(os.environ.get("PISTON_FUZZ_EXAMPLES", "10"))
SEED = int(os.environ.get("PISTON_FUZZ_SEED", "7"))


@pytest.fixture(scope="module")
def fuzz_server(tiny_models):
    server = ServerProcess(tiny_models("llama"), *TINY_ARGS, "--served-model-name", "tiny", "--max-n", "2",
                           "--max-prompts-per-request", "4", "--max-stop-sequences", "4",
                           "--metrics-require-api-key")
    yield server.wait_ready()
    server.stop()


def test_schemathesis_finds_no_5xx_and_no_schema_violation(fuzz_server, tmp_path):
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
    cmd = [exe, "--config-file", str(HERE / "schemathesis.toml"), "run", f"{fuzz_server.url}/openapi.json",
           "--checks", "all", "-H", f"Authorization: Bearer {fuzz_server.api_key}", "--max-examples", str(EXAMPLES),
           "--seed", str(SEED), "--request-timeout", "60", "--no-color", "--workers", "1"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    report = result.stdout + result.stderr
    generated = re.search(r"(\d+) generated", report)
    log = fuzz_server.log_tail(10**8)
    server_errors = re.findall(r'" 5\d\d ', log)
    print(f"schemathesis: {generated.group(1) if generated else '?'} cases, {EXAMPLES} examples per operation, "
          f"seed {SEED}; the server answered {len(server_errors)} 5xx")
    assert result.returncode == 0, report[-6000:]
    assert generated and int(generated.group(1)) > 0, report[-2000:]
    assert not server_errors, server_errors
    assert fuzz_server.proc.poll() is None, "the server exited under fuzzing"

"""Real `piston serve` processes on free loopback ports, for the end-to-end tests.

All servers of a module are launched together (model loading overlaps) and each
fixture waits for its own one to answer /health. Teardown always stops them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

try:
    import httpx
except ImportError:  # some environments ship httpx under its successor's name
    import httpx2 as httpx

API_KEY = "test-key"
READY_TIMEOUT_S = 120.0
TINY_ARGS = ["--max-model-len", "256", "--kv-cache-memory", "8MiB", "--max-num-seqs", "64"]
SMOLLM2_ARGS = ["--max-model-len", "512", "--kv-cache-memory", "64MiB"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `piston serve` subprocess; its output goes to a log file shown on failure."""

    def __init__(self, model: str, *args: str, api_key: str | None = API_KEY,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="piston-serve-", suffix=".log",
                                               delete=False)
        cmd = [sys.executable, "-m", "piston.entrypoints.cli", "serve", model,
               "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-n:]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None:
                pytest.fail(f"piston serve exited with {self.proc.returncode} before it was "
                            f"ready:\n{self.log_tail()}", pytrace=False)
            try:
                self.ready = httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if not self.ready:
                if time.monotonic() > deadline:
                    pytest.fail(f"piston serve not ready in {timeout:.0f} s:\n{self.log_tail()}",
                                pytrace=False)
                time.sleep(0.25)
        return self

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                             max_retries=0, timeout=60, **kwargs)

    def async_openai(self):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                                  max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        """The value of an unlabelled-but-model_name metric from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name} not in /metrics:\n{text}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def launched_servers(tiny_models, smollm2_path):
    """Start every server this module uses at once; stop them all at the end."""
    tiny = tiny_models("llama")
    timeline = tempfile.NamedTemporaryFile(prefix="piston-timeline-", suffix=".jsonl", delete=False)
    timeline.close()
    servers = {
        "tiny": ServerProcess(tiny, *TINY_ARGS, "--served-model-name", "tiny",
                              "--request-timeline-file", timeline.name),
        "smollm2": ServerProcess(smollm2_path, *SMOLLM2_ARGS, "--served-model-name", "smollm2"),
    }
    servers["tiny"].timeline_file = timeline.name
    yield servers
    for server in servers.values():
        server.stop()
    os.unlink(timeline.name)


@pytest.fixture(scope="module")
def tiny_server(launched_servers) -> ServerProcess:
    """A server for a tiny random model ("tiny"); requires API_KEY. It writes a request
    timeline to ``.timeline_file``."""
    return launched_servers["tiny"].wait_ready()


@pytest.fixture(scope="module")
def smollm2_server(launched_servers) -> ServerProcess:
    """A server for the real SmolLM2-135M-Instruct ("smollm2")."""
    return launched_servers["smollm2"].wait_ready()

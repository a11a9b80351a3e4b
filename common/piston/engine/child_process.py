"""ChildProcess: the engine process, started as ``python -m piston.engine.core_proc``.

A fresh interpreter (not multiprocessing's spawn) never re-imports the user's
``__main__``, so scripts need no ``if __name__ == "__main__":`` guard, and it carries
no forked torch or thread state. The handshake comes back over an inherited pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.connection import Connection

CONFIG_ENV = "PISTON_ENGINE_CONFIG"


class ChildProcess:
    """A small ``multiprocessing.Process``-like view of a subprocess."""

    def __init__(self, config_bytes: bytes, input_addr: str, output_addr: str) -> None:
        ready_r, ready_w = os.pipe()
        env = dict(os.environ, **{CONFIG_ENV: config_bytes.hex()})
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "piston.engine.core_proc", str(ready_w), input_addr,
                 output_addr, str(os.getpid())],
                env=env, pass_fds=(ready_w,), stdin=subprocess.DEVNULL)
        finally:
            os.close(ready_w)
        self.ready_conn = Connection(ready_r, writable=False)
        self.pid = self._popen.pid
        # Readable once the process exits: lets one wait() watch sockets and death together.
        self.sentinel = os.pidfd_open(self.pid)

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def close(self) -> None:
        for closer in (self.ready_conn.close, lambda: os.close(self.sentinel)):
            try:
                closer()
            except OSError:
                pass

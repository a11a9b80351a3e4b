"""ChildProcess: how Piston starts its own processes, on both sides of the fork.

The engine process (``piston.engine.core_proc``) and the tensor-parallel worker processes
(``piston.executor.worker_proc``) are both started here, the same way: a fresh
interpreter running ``python -m <module> <args>``, with the encoded EngineConfig handed
over in the environment (never on the command line, never pickled). A fresh interpreter,
unlike multiprocessing's spawn, never re-imports the user's ``__main__`` (scripts need no
``if __name__ == "__main__":`` guard) and carries no forked torch or thread state.

Parent side: ``ChildProcess`` (pid, exit code, a pidfd sentinel that ``wait()`` can watch
together with sockets, an optional start-up pipe, terminate/kill/join). Child side:
``ChildContext.enter()`` reads what the parent handed over and installs the common
signal handling; ``parent_alive()`` and ``exit_now()`` are shared by both loops.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Sequence

CONFIG_ENV = "PISTON_CHILD_CONFIG"
PARENT_ENV = "PISTON_PARENT_PID"
READY_FD_ENV = "PISTON_READY_FD"


class ChildProcess:
    """A small ``multiprocessing.Process``-like view of a child interpreter."""

    def __init__(self, module: str, args: Sequence[str], config_bytes: bytes,
                 env: dict[str, str] | None = None, ready_pipe: bool = False) -> None:
        child_env = dict(os.environ, **(env or {}))
        child_env[CONFIG_ENV] = config_bytes.hex()
        child_env[PARENT_ENV] = str(os.getpid())
        pass_fds: tuple[int, ...] = ()
        ready_r = ready_w = None
        if ready_pipe:
            ready_r, ready_w = os.pipe()
            child_env[READY_FD_ENV] = str(ready_w)
            pass_fds = (ready_w,)
        try:
            self._popen = subprocess.Popen([sys.executable, "-m", module, *args], env=child_env,
                                           pass_fds=pass_fds, stdin=subprocess.DEVNULL)
        finally:
            if ready_w is not None:
                os.close(ready_w)
        # The child's start-up message arrives here (when asked for); EOF if it dies first.
        self.ready_conn = Connection(ready_r, writable=False) if ready_r is not None else None
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

    def stop(self, grace_s: float = 5.0) -> None:
        """Wait ``grace_s`` for the child to exit on its own, then terminate, then kill."""
        self.join(grace_s)
        if self.is_alive():
            self.terminate()
            self.join(2)
        if self.is_alive():
            self.kill()
            self.join(2)

    def close(self) -> None:
        closers = [lambda: os.close(self.sentinel)]
        if self.ready_conn is not None:
            closers.append(self.ready_conn.close)
        for closer in closers:
            try:
                closer()
            except OSError:
                pass


@dataclass
class ChildContext:
    """What a child process got from its parent."""

    config_bytes: bytes
    parent_pid: int
    ready_conn: Connection | None

    @classmethod
    def enter(cls, die_with_parent: bool = False) -> "ChildContext":
        """Read the hand-over from the environment and set up the child: Ctrl-C is ignored
        (it reaches the whole process group; the parent decides and then stops us), SIGTERM
        exits, and with ``die_with_parent`` Linux kills us when the parent exits."""
        from piston.logger import configure_logging

        if die_with_parent:
            _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        configure_logging()
        ready_fd = os.environ.pop(READY_FD_ENV, None)
        return cls(config_bytes=bytes.fromhex(os.environ.pop(CONFIG_ENV)),
                   parent_pid=int(os.environ.pop(PARENT_ENV)),
                   ready_conn=Connection(int(ready_fd), readable=False) if ready_fd else None)

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the thread that started it exits (the parent's
    main thread, for the processes that use it)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the child's poll loop notices the parent's death instead


def exit_now(code: int) -> None:
    """Exit without interpreter teardown (seconds with torch loaded; everything is closed
    already), after running the exit hooks, which release multiprocessing locks and logs."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

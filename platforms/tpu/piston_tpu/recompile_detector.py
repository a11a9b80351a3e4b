"""RecompileDetector: fails loudly when XLA compiles anything after warm-up.

Every bucket is compiled before the first request. A compilation during serving means an
input escaped its bucket (or an eager jax op slipped into the hot path) and costs seconds,
so it is an error, not a slowdown. The detector listens to JAX's backend-compile event,
which fires for fresh compilations and persistent-cache loads alike.
"""

from __future__ import annotations

import threading

from jax import monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class RecompileError(RuntimeError):
    """XLA compiled a program after warm-up."""


class RecompileDetector:
    """Counts compilations; after ``arm()``, ``check()`` raises if any happened."""

    _listening: list["RecompileDetector"] = []
    _lock = threading.Lock()
    _installed = False

    def __init__(self) -> None:
        self.armed = False
        self.num_compiles = 0
        self.late_compiles: list[str] = []

    @classmethod
    def _on_event(cls, event: str, duration: float, **kwargs) -> None:
        if event != _BACKEND_COMPILE_EVENT:
            return
        name = str(kwargs.get("fun_name", "?"))
        for detector in list(cls._listening):
            detector.num_compiles += 1
            if detector.armed:
                detector.late_compiles.append(f"{name} ({duration:.2f} s)")

    def __enter__(self) -> "RecompileDetector":
        with self._lock:
            if not RecompileDetector._installed:
                monitoring.register_event_duration_secs_listener(RecompileDetector._on_event)
                RecompileDetector._installed = True
            self._listening.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            if self in self._listening:
                self._listening.remove(self)

    def arm(self) -> None:
        """Warm-up is over: from now on every compilation is an error."""
        self.armed = True
        self.late_compiles.clear()

    def check(self, where: str = "") -> None:
        """Raise RecompileError naming the programs compiled since ``arm()``."""
        if self.late_compiles:
            names = ", ".join(self.late_compiles[:5])
            self.late_compiles.clear()
            raise RecompileError(
                f"XLA compiled {names} after warm-up{' during ' + where if where else ''}: an input "
                "shape escaped its bucket. Every program must be compiled in warm_up().")

"""Executors: how the tensor-parallel ranks run, behind the same four calls.

``uni``: one worker inside the EngineCore process. ``mp``: one process per rank on this
host, fed by a ZMQ broadcast. ``ray``: Ray actors in a placement group, which may span
nodes. Executors sit below the engine and never import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from piston.executor.abstract import Executor
    from piston.step.config import EngineConfig


def executor_class(config: "EngineConfig") -> type["Executor"]:
    """The Executor class for ``config.parallel_config.executor_backend``."""
    backend = config.parallel_config.executor_backend
    if backend == "uni":
        from piston.executor.uniproc import UniProcExecutor

        return UniProcExecutor
    if backend == "mp":
        from piston.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor
    if backend == "ray":
        from piston.executor.ray_executor import RayExecutor

        return RayExecutor
    raise ValueError(f"distributed_executor_backend={backend!r} is unknown; use uni, mp or ray.")

"""create_worker: the same start-up on every rank, whichever executor runs it."""

from __future__ import annotations

import importlib
import logging
import random

from piston.hal.interface import Platform, Worker
from piston.step.config import EngineConfig

logger = logging.getLogger(__name__)


def create_worker(config: EngineConfig, platform: type[Platform], rank: int, world_size: int,
                  init_method: str | None = None) -> Worker:
    """Seed, join the tensor-parallel group, build the platform's worker, add the extension.

    Every rank seeds its random generators with the same ``seed``, so ranks that sample the
    same logits draw the same tokens and their request states stay identical.
    """
    seed = config.model_config.seed
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.manual_seed(seed)
    if world_size > 1:
        from piston.distributed.parallel_state import init_distributed

        if init_method is None:
            raise ValueError("init_method is needed to join a tensor-parallel group.")
        init_distributed(platform.distributed_backend(), rank, world_size, init_method)
    worker = platform.make_worker(config, rank=rank, world_size=world_size)
    ext = config.parallel_config.worker_extension_cls
    if ext:
        apply_worker_extension(worker, ext)
    return worker


def load_worker_extension(path: str) -> type:
    module, _, name = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"worker_extension_cls={path!r}: expected 'module:Class'.")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"worker_extension_cls={path!r}: cannot import it ({e}).") from e
    if not isinstance(cls, type):
        raise ValueError(f"worker_extension_cls={path!r} is not a class.")
    return cls


def apply_worker_extension(worker: Worker, path: str) -> None:
    """Mix the user's class into this worker's class: its methods become RPC targets."""
    ext = load_worker_extension(path)
    base = type(worker)
    clashes = sorted(n for n in vars(ext) if not n.startswith("__") and hasattr(base, n))
    if clashes:
        raise ValueError(f"worker_extension_cls {path!r} redefines worker methods {clashes}; "
                         "rename them so the worker keeps working.")
    worker.__class__ = type(f"{base.__name__}With{ext.__name__}", (base, ext), {})
    logger.info("Worker extension %s added to %s.", path, base.__name__)

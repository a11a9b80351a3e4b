"""JAX's persistent compilation cache, under Piston's cache directory.

XLA programs are keyed by their HLO, compile options and jaxlib version, so an engine
started again with the same model and settings (or another model's sampler programs,
which depend only on the vocabulary size) loads them from disk instead of compiling.
``PISTON_TPU_COMPILATION_CACHE=0`` turns it off.
"""

from __future__ import annotations

import logging
import os

import jax

# Under "piston" so the engine's log handler shows it.
logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))


def enable_compilation_cache(cache_dir: str | None) -> str | None:
    """Point JAX at ``cache_dir`` (default: <piston cache>/jax-<backend>); returns the folder or None."""
    if os.environ.get("PISTON_TPU_COMPILATION_CACHE", "1") == "0":
        return None
    if cache_dir is None:
        from piston.model_resolver import cache_dir as piston_cache_dir

        cache_dir = os.path.join(piston_cache_dir(), f"jax-{jax.default_backend()}")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        logger.warning("No persistent compilation cache (%s); every start-up compiles from scratch.", e)
        return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program: a bucket set is dozens of programs, each cheap but adding up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir

"""Which ragged paged attention runs the model: the Pallas kernel or the plain-JAX path.

``PISTON_TPU_ATTENTION`` = ``pallas`` | ``xla`` | ``auto`` (default). On a TPU, auto is the
Pallas kernel, compiled by Mosaic. On JAX's CPU backend the kernel can only run in
interpret mode, which costs seconds per call, so auto runs it only for models of at most
``INTERPRET_MAX_LAYERS`` layers (the tiny test models) and uses the plain-JAX path for
larger ones (SmolLM2). Both take the same arguments and give the same result.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

from piston_tpu.attention_pallas import DEFAULT_KEYS_PER_BLOCK, pages_per_kv_block, ragged_paged_attention_pallas
from piston_tpu.attention_xla import ragged_paged_attention_xla

INTERPRET_MAX_LAYERS = 8
CHOICES = ("auto", "pallas", "xla")


def choose_attention(num_layers: int, on_tpu: bool) -> str:
    """"pallas" or "xla" for this model and backend (see the module docstring)."""
    choice = os.environ.get("PISTON_TPU_ATTENTION", "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"PISTON_TPU_ATTENTION={choice!r} is not one of {', '.join(CHOICES)}.")
    if choice != "auto":
        return choice
    return "pallas" if on_tpu or num_layers <= INTERPRET_MAX_LAYERS else "xla"


def make_attention(name: str, sm_scale: float, on_tpu: bool, block_size: int, precision) -> Callable:
    """The attention function the model calls: (q, kv_cache, layer, metadata) -> out."""
    if name == "pallas":
        # The interpreter's compile time grows with the DMAs per KV block; two pages per block
        # keep multi-page copies and double buffering while compiling ~2x faster.
        keys = DEFAULT_KEYS_PER_BLOCK if on_tpu else min(DEFAULT_KEYS_PER_BLOCK, 2 * block_size)
        return functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale, interpret=not on_tpu,
                                 keys_per_block=keys, precision=precision)
    return functools.partial(ragged_paged_attention_xla, sm_scale=sm_scale, precision=precision)


def page_table_multiple(block_size: int) -> int:
    """Page tables are padded to a multiple of this many pages (the kernel's largest KV block)."""
    return pages_per_kv_block(block_size)

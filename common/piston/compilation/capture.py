"""Capture strategies: how a platform runs the compiled pieces of a split model.

The compiled model calls ``begin_step(num_tokens)`` once per forward (after padding the
inputs to ``padded_num_tokens``), then every piece through the wrapper that
``wrap_piece`` returned. A strategy that captures graphs (CUDA) replays one graph per
piece and capture size; ``NoCapture`` (the CPU) runs the compiled pieces as they are.
Capture itself happens inside ``capturing()``, when the runner's warm-up runs a dummy
batch of each capture size (``capture_graphs`` in piston.compilation.compiled_model).
"""

from __future__ import annotations

import abc
import bisect
import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from piston.attention.metadata import CommonAttentionMetadata


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, ... up to ``max_num_seqs`` (which is included even if not a power of 2)."""
    sizes, s = [], 1
    while s < max_num_seqs:
        sizes.append(s)
        s *= 2
    sizes.append(max_num_seqs)
    return sizes


def pad_to_capture_size(num_tokens: int, capture_sizes: Sequence[int]) -> int:
    """The smallest capture size >= ``num_tokens`` (sizes sorted ascending), else ``num_tokens``."""
    i = bisect.bisect_left(capture_sizes, num_tokens)
    return capture_sizes[i] if i < len(capture_sizes) else num_tokens


class CaptureStrategy(abc.ABC):
    """How compiled pieces run. Subclasses decide what a piece wrapper does per step."""

    name: str = ""

    def __init__(self, capture_sizes: Sequence[int] = ()) -> None:
        if any(s < 1 for s in capture_sizes):
            raise ValueError(f"capture sizes must be positive, got {list(capture_sizes)}.")
        self.capture_sizes: tuple[int, ...] = tuple(sorted(set(capture_sizes)))
        # The (padded) number of tokens of the forward pass that is running.
        self.num_tokens = 0

    def padded_num_tokens(self, num_tokens: int) -> int:
        """The size a step of ``num_tokens`` runs at: the next capture size, or itself above them."""
        return pad_to_capture_size(num_tokens, self.capture_sizes)

    def pad_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``positions`` extended with zeros to ``padded`` rows."""
        n = input_ids.shape[0]
        if padded == n:
            return input_ids, positions
        ids = input_ids.new_zeros(padded)
        pos = positions.new_zeros(padded)
        ids[:n] = input_ids
        pos[:n] = positions
        return ids, pos

    def begin_step(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    @abc.abstractmethod
    def wrap_piece(self, index: int, piece: Callable) -> Callable:
        """The callable the split graph calls for compiled piece ``index`` (0-based)."""

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Forward passes inside this context capture graphs for their size (if the strategy does)."""
        yield

    @property
    def captures_graphs(self) -> bool:
        return False

    def drop_graphs(self) -> None:
        """Forget every captured graph (their inputs moved: weights restored elsewhere); the
        next ``capturing()`` pass captures them again."""


class NoCapture(CaptureStrategy):
    """The CPU strategy: compiled pieces run as they are. It pads only when capture sizes
    are given explicitly (that exercises the padding path; it buys nothing on a CPU)."""

    name = "none"

    def wrap_piece(self, index: int, piece: Callable) -> Callable:
        return piece


def dummy_decode_metadata(num_tokens: int, block_size: int, device: torch.device) -> CommonAttentionMetadata:
    """A decode batch of ``num_tokens`` one-token sequences, all in block 0 (for warm-up and
    capture, before any request owns a block: what it writes there is never read)."""
    qsl = np.arange(num_tokens + 1, dtype=np.int32)
    seq_lens = np.ones(num_tokens, dtype=np.int32)
    return CommonAttentionMetadata(
        num_reqs=num_tokens, num_actual_tokens=num_tokens, max_query_len=1, max_seq_len=1,
        query_start_loc_np=qsl, seq_lens_np=seq_lens,
        query_start_loc=torch.from_numpy(qsl).to(device), seq_lens=torch.from_numpy(seq_lens).to(device),
        block_table=torch.zeros((num_tokens, 1), dtype=torch.int32, device=device),
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        block_size=block_size)

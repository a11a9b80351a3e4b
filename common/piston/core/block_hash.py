"""Chained block hashing: the key under which a full KV block is cached.

A block's hash covers its parent's hash, its token ids and any extra keys (LoRA name,
image hashes, a cache salt), so equal hashes mean equal prefixes up to and including
the block. The digest is SHA-256 cut to 128 bits: a false hit would silently reuse the
wrong KV and corrupt output, so a fast non-cryptographic hash is not good enough.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from piston.core.request import Request

_HASH_BYTES = 16
# Parent of a request's first block; fixed so hashes are stable across processes and runs.
ROOT_BLOCK_HASH = int.from_bytes(hashlib.sha256(b"piston.block_hash.root").digest()[:_HASH_BYTES], "little")


def hash_block_tokens(
    parent_hash: int, token_ids: Sequence[int], extra_keys: Sequence[Any] | None = None
) -> int:
    """The 128-bit hash of one block given its parent's hash.

    Token ids are hashed as little-endian int64, so the result does not depend on the
    machine. ``extra_keys`` enter through their ``repr`` and must therefore have a
    stable one (strings, ints, tuples of those).
    """
    h = hashlib.sha256(parent_hash.to_bytes(_HASH_BYTES, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_keys:
        # Separator so extra keys can never be mistaken for token bytes.
        h.update(b"\x00extra:")
        h.update(repr(tuple(extra_keys)).encode())
    return int.from_bytes(h.digest()[:_HASH_BYTES], "little")


def update_request_block_hashes(
    request: "Request", block_size: int, extra_keys: Sequence[Any] | None = None
) -> None:
    """Extend ``request.block_hashes`` to cover every full block of ``all_token_ids``.

    Incremental: only blocks not hashed yet are hashed, so generated tokens that fill a
    block make it cacheable too. Calling it again without new full blocks is a no-op.
    """
    hashes = request.block_hashes
    tokens = request.all_token_ids
    num_full_blocks = len(tokens) // block_size
    parent = hashes[-1] if hashes else ROOT_BLOCK_HASH
    for i in range(len(hashes), num_full_blocks):
        start = i * block_size
        parent = hash_block_tokens(parent, tokens[start:start + block_size], extra_keys)
        hashes.append(parent)

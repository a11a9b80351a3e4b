"""An external KV store for test_kv_offload (``--kv-offloading-backend kv_store_ext:RecordingStore``):
the native store, recording how many saves and loads each order carried in the file that
PISTON_TEST_KV_LOG names."""

from __future__ import annotations

import os

from piston.step.kv_transfer import KVTierStore


class RecordingStore(KVTierStore):
    def apply(self, t, read_blocks, write_blocks) -> None:
        with open(os.environ["PISTON_TEST_KV_LOG"], "a") as f:
            f.write(f"{len(t.saves)} {len(t.loads)}\n")
        super().apply(t, read_blocks, write_blocks)

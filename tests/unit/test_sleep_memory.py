"""Sleep mode gives memory back on the CPU platform: the engine process's resident set falls
by the weights and the touched KV cache, and rises again at the wake-up (issue 21)."""

from __future__ import annotations

import os

import numpy as np
import psutil
import pytest
from safetensors import safe_open

from piston import SamplingParams

pytestmark = pytest.mark.skipif(os.environ.get("PISTON_PLATFORM", "cpu") != "cpu",
                                reason="resident memory is the device memory only on the CPU platform")


def _weight_bytes(folder: str) -> int:
    with safe_open(f"{folder}/model.safetensors", framework="np") as f:
        return sum(int(np.prod(f.get_slice(n).get_shape())) * 4 for n in f.keys())


def test_sleep_releases_weights_and_kv_cache_from_the_resident_set(tiny_models, make_llm):
    path = tiny_models("llama-256")  # 49k x 256 embeddings and lm_head: about 100 MB of float32
    weights = _weight_bytes(path)
    llm = make_llm(path, max_model_len=512, kv_cache_memory="64MiB", seed=0, dtype="float32")
    engine = psutil.Process(llm.llm_engine.engine_core.engine_pid)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    # Touch the KV cache: 64 prompts of 480 tokens fill more than 32 MiB of it.
    llm.generate([[100 + i] * 480 for i in range(64)], SamplingParams(max_tokens=1), use_tqdm=False)
    expected = llm.generate([[5, 6, 7]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    awake = engine.memory_info().rss

    llm.sleep(level=1)
    asleep = engine.memory_info().rss
    assert awake - asleep > 0.8 * (weights + 32 * 2**20), (awake, asleep, weights)

    llm.wake_up()
    assert llm.generate([[5, 6, 7]], greedy, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert engine.memory_info().rss - asleep > 0.8 * weights

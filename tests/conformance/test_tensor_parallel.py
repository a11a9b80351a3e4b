"""Tensor parallelism changes nothing: TP=2 gives the same greedy tokens (and seeded
samples) as TP=1, on tiny models that split evenly, replicate a single KV head, or split
3 KV heads 2 + 1, and on SmolLM2 (9 q heads, 3 KV heads).

Runs on every platform that can run two ranks (the mp executor: one process per rank).
"""

from __future__ import annotations

import pytest
from piston import SamplingParams
from piston.hal.registry import get_platform

TP_KWARGS = dict(kv_cache_memory="32MiB", max_model_len=512, seed=0, dtype="float32")
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "1 2 3 4"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(autouse=True)
def _needs_two_ranks():
    platform = get_platform(None)
    if not platform.supports_tensor_parallel:
        pytest.skip(f"platform {platform.name} runs one rank only (supports_tensor_parallel=False)")


def _tokens(llm, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2", "qwen3", "llama-mqa", "llama-uneven"])
def test_tp2_greedy_tokens_equal_tp1(name, tiny_models, make_llm):
    path = tiny_models(name)
    expected = _tokens(make_llm(path, **TP_KWARGS))
    assert _tokens(make_llm(path, tensor_parallel_size=2, **TP_KWARGS)) == expected


def test_tp2_seeded_sampling_equals_tp1(tiny_models, make_llm):
    path = tiny_models("llama")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    expected = _tokens(make_llm(path, **TP_KWARGS), params)
    assert _tokens(make_llm(path, tensor_parallel_size=2, **TP_KWARGS), params) == expected


def test_tp2_smollm2_text_equals_tp1(smollm2_path, smollm2_llm, make_llm, smollm2_llm_kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    expected = smollm2_llm.generate(PROMPTS, params, use_tqdm=False)
    tp2 = make_llm(smollm2_path, tensor_parallel_size=2, distributed_executor_backend="mp",
                   **smollm2_llm_kwargs)
    got = tp2.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_tp2_weight_update_and_sleep_equal_tp1(tiny_models, make_llm):
    """update_weights sends full tensors; each rank takes its shard ("llama-uneven" splits 3
    KV heads 2 + 1 and an odd MLP width). Sleep and wake-up reach every rank."""
    from safetensors.numpy import load_file

    path = tiny_models("llama-uneven")
    tp1 = make_llm(path, **TP_KWARGS)
    expected = _tokens(tp1)
    scaled = {name: (w * 0.5 if "mlp" in name else w) for name, w in load_file(f"{path}/model.safetensors").items()}
    tp1.update_weights(scaled.items())
    expected_scaled = _tokens(tp1)
    assert expected_scaled != expected, "halving the MLP weights should change the output"

    tp2 = make_llm(path, tensor_parallel_size=2, **TP_KWARGS)
    assert _tokens(tp2) == expected
    assert tp2.update_weights(scaled.items()) == len(scaled)
    assert _tokens(tp2) == expected_scaled
    tp2.sleep(level=2)
    tp2.wake_up()  # level 2: the checkpoint's weights come back on every rank
    assert _tokens(tp2) == expected

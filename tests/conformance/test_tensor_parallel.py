"""Tensor parallelism changes nothing: TP=2 gives the same greedy tokens (and seeded
samples) as TP=1, on tiny models that split evenly, replicate a single KV head, or split
3 KV heads 2 + 1, on a mixture-of-experts model, and on SmolLM2 (9 q heads, 3 KV heads).

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


# "qwen2-moe": each expert's intermediate rows and the shared expert's split over the ranks,
# their partial sums added and all-reduced once per MoE block.
@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2", "qwen3", "llama-mqa", "llama-uneven", "qwen2-moe"])
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


def test_tp2_lora_mixed_batch_equals_tp1(tiny_models, make_llm, tmp_path):
    """LoRA under tensor parallelism: column-parallel layers keep their rows of B (q/k/v split
    by uneven head groups, gate/up of an odd width), row-parallel ones their columns of A and
    add a partial delta before the all-reduce. A batch mixing two adapters (rank 8 on all seven
    projections; rank 4 on q/v/down only) and the base model gives the same tokens at TP=2 as
    at TP=1 (which test_lora checks against transformers + peft)."""
    from piston import LoRARequest
    from reference import reference

    if not get_platform(None).supports_lora:
        pytest.skip("the platform cannot serve LoRA adapters (supports_lora=False)")
    path = tiny_models("llama-uneven")
    a = reference().build_peft_adapter(path, str(tmp_path / "a"), 8, 16, 21, None, False, 3.0)
    b = reference().build_peft_adapter(path, str(tmp_path / "b"), 4, 8, 22, ["q_proj", "v_proj", "down_proj"],
                                       False, 3.0)
    loras = [LoRARequest("a", 1, a), None, LoRARequest("b", 2, b), LoRARequest("a", 1, a)]
    lora_kwargs = dict(enable_lora=True, max_loras=2, max_lora_rank=8, **TP_KWARGS)

    def run(llm) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=loras)]

    tp1 = make_llm(path, **lora_kwargs)
    expected = run(tp1)
    base = _tokens(tp1)
    assert expected[0] != base[0] and expected[2] != base[2] and expected[1] == base[1]  # the adapters act
    assert run(make_llm(path, tensor_parallel_size=2, **lora_kwargs)) == expected

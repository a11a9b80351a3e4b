"""Sleep mode and in-place weight updates, for RLHF loops (issue 21), on every platform.

Each check compares greedy float32 output with transformers on the same weights:
- after sleep level 1 or 2 and a wake-up (both parts at once, or weights then KV cache);
- for requests that were running when the engine went to sleep (computed again after it);
- after ``update_weights`` with a second checkpoint's tensors: exactly that checkpoint's
  output, from the same engine process; ``reload_weights`` brings the first one back.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import REFERENCE_PROMPTS, assert_no_near_ties, hf_greedy
from safetensors.numpy import load_file

from piston import SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
LLM_KWARGS = dict(max_model_len=512, kv_cache_memory="32MiB", seed=0, dtype="float32")


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer) -> list[list[int]]:
    return [smollm2_tokenizer(p).input_ids for p in REFERENCE_PROMPTS]


def _reference(path: str, prompt_ids) -> list[list[int]]:
    ref = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(ref)
    # ignore_eos: compare only up to an EOS the reference stopped at.
    return [r.token_ids for r in ref]


def _assert_greedy(llm, prompt_ids, reference) -> None:
    got = _tokens(llm.generate([list(p) for p in prompt_ids], GREEDY, use_tqdm=False))
    for i, (g, r) in enumerate(zip(got, reference)):
        assert g[:len(r)] == r, f"prompt {i}"


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_up_keep_the_output(level, tiny_models, make_llm, prompt_ids):
    path = tiny_models("llama")
    reference = _reference(path, prompt_ids)
    llm = make_llm(path, **LLM_KWARGS)
    _assert_greedy(llm, prompt_ids, reference)
    pid = llm.llm_engine.engine_core.engine_pid

    llm.sleep(level=level)
    assert llm.is_sleeping()
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate("Hello", GREEDY, use_tqdm=False)
    with pytest.raises((RuntimeError, ValueError), match="already asleep"):
        llm.sleep(level=1)
    if level == 2:  # in stages, as an RLHF loop does: weights (to update them), then the cache
        llm.wake_up(tags=["weights"])
        assert llm.is_sleeping()
        llm.wake_up(tags=["kv_cache"])
    else:
        llm.wake_up()
    assert not llm.is_sleeping()
    # The prefix cache was emptied with the KV cache: nothing of the first run is a hit.
    outputs = llm.generate([list(p) for p in prompt_ids], GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0] * len(prompt_ids)
    for i, (o, r) in enumerate(zip(outputs, reference)):
        assert o.outputs[0].token_ids[:len(r)] == r, f"prompt {i}"
    assert llm.llm_engine.engine_core.engine_pid == pid


def test_sleep_sends_running_requests_back_and_they_finish_after_the_wake_up(
        tiny_models, make_llm, prompt_ids):
    path = tiny_models("llama")
    reference = _reference(path, prompt_ids)
    llm = make_llm(path, **LLM_KWARGS)
    engine = llm.llm_engine
    for i, ids in enumerate(prompt_ids):
        engine.add_request(f"r{i}", list(ids), GREEDY)
    finished = {}
    for _ in range(3):  # prefill and a few tokens
        for out in engine.step(final_only=True):
            finished[out.request_id] = out
    running = engine.get_stats().num_running
    assert running > 0
    llm.sleep(level=1)
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (0, len(prompt_ids) - len(finished))
    assert stats.kv_cache_usage == 0.0 and stats.num_preemptions == 0
    llm.wake_up()
    while engine.has_unfinished_requests():
        for out in engine.step(final_only=True):
            finished[out.request_id] = out
    for i, ref in enumerate(reference):
        got = finished[f"r{i}"].outputs[0].token_ids
        assert got[:len(ref)] == ref, f"prompt {i}"


def test_update_weights_serves_the_new_checkpoint_in_the_same_process(tiny_models, make_llm, prompt_ids):
    path_a, path_b = tiny_models("llama"), tiny_models("llama-b")
    ref_a, ref_b = _reference(path_a, prompt_ids), _reference(path_b, prompt_ids)
    assert ref_a != ref_b, "the two checkpoints should answer differently"
    llm = make_llm(path_a, **LLM_KWARGS)
    pid = llm.llm_engine.engine_core.engine_pid
    _assert_greedy(llm, prompt_ids, ref_a)

    weights_b = load_file(f"{path_b}/model.safetensors")
    applied = llm.update_weights(sorted(weights_b.items()))
    assert applied == len(weights_b)
    _assert_greedy(llm, prompt_ids, ref_b)
    assert llm.llm_engine.engine_core.engine_pid == pid

    # A partial update (one layer's MLP back to checkpoint a) and bad input.
    weights_a = load_file(f"{path_a}/model.safetensors")
    with pytest.raises((RuntimeError, ValueError), match="no place"):
        llm.update_weights([("model.layers.99.mlp.up_proj.weight", weights_a["model.layers.0.mlp.up_proj.weight"])])
    with pytest.raises((RuntimeError, ValueError), match="shape"):
        llm.update_weights([("model.layers.0.mlp.up_proj.weight", np.zeros((3, 3), np.float32))])
    with pytest.raises(TypeError):
        llm.update_weights([("model.norm.weight", [1.0, 2.0])])
    _assert_greedy(llm, prompt_ids, ref_b)  # nothing of the bad calls was applied

    # After a level-2 sleep the weights come back from the checkpoint; so does reload_weights.
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])
    llm.update_weights(sorted(weights_b.items()))  # installed before the KV cache wakes
    llm.wake_up(tags=["kv_cache"])
    _assert_greedy(llm, prompt_ids, ref_b)
    llm.reload_weights()
    _assert_greedy(llm, prompt_ids, ref_a)
    assert llm.llm_engine.engine_core.engine_pid == pid

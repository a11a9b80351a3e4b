"""The piecewise-compiled model in the engine gives the eager engine's outputs on the CPU.

Each engine compiles through Inductor into one compile cache for the session, so the
padding test (the same tiny model again) starts from the cache.
"""

from __future__ import annotations

import pytest

from piston import SamplingParams

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hi",
           "List three primary colors:"]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3)
ENGINE_KWARGS = dict(max_model_len=512, kv_cache_memory="64MiB", seed=0, dtype="float32")


@pytest.fixture(scope="module")
def compile_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("piston-compile-cache"))


def _assert_same_outputs(eager, compiled) -> None:
    for a, b in zip(eager, compiled):
        ea, eb = a.outputs[0], b.outputs[0]
        assert ea.token_ids == eb.token_ids, a.prompt
        for step_a, step_b, token in zip(ea.logprobs, eb.logprobs, ea.token_ids):
            assert step_a[token].logprob == pytest.approx(step_b[token].logprob, abs=1e-3)


def _generate(llm):
    return llm.generate(PROMPTS, PARAMS, use_tqdm=False)


# qwen2-moe: the fused-experts op (routing sizes that depend on the data) inside a compiled
# piece; gemma3: sliding windows, sandwich norms and the final soft-cap compiled.
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2-moe", "gemma3"])
def test_piecewise_engine_matches_eager_on_tiny_models(name, tiny_models, make_llm, compile_cache_dir):
    path = tiny_models(name)
    eager = _generate(make_llm(path, compilation_mode="eager", **ENGINE_KWARGS))
    compiled = _generate(make_llm(path, compilation_mode="piecewise", compilation_cache_dir=compile_cache_dir,
                                  **ENGINE_KWARGS))
    _assert_same_outputs(eager, compiled)


def test_piecewise_engine_with_capture_sizes_pads_and_matches_eager(tiny_models, make_llm, compile_cache_dir):
    # Five prompts, then decode batches of 5 and fewer: every step pads to 8 (or 16 for prefill chunks).
    path = tiny_models("llama")
    eager = _generate(make_llm(path, compilation_mode="eager", **ENGINE_KWARGS))
    padded = _generate(make_llm(path, compilation_mode="piecewise", capture_sizes=[1, 2, 8, 16],
                                compilation_cache_dir=compile_cache_dir, **ENGINE_KWARGS))
    _assert_same_outputs(eager, padded)


@pytest.mark.slow  # 34 s; the tiny models above cover piecewise compilation in the default suite
def test_piecewise_engine_matches_eager_on_smollm2(smollm2_path, make_llm, compile_cache_dir):
    eager = _generate(make_llm(smollm2_path, compilation_mode="eager", **ENGINE_KWARGS))
    compiled = _generate(make_llm(smollm2_path, compilation_mode="piecewise",
                                  compilation_cache_dir=compile_cache_dir, **ENGINE_KWARGS))
    _assert_same_outputs(eager, compiled)

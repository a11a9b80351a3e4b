"""The TPU platform's JAX model runner, in process, on a tiny random Llama.

Pins the runner's contract with the core: steps come as scheduler diffs (new requests,
cached ones with new blocks, finished ids), chunked prefill gives the same tokens as a
whole prompt, the Pallas kernel and the plain-JAX path agree, and after warm-up no step
compiles anything: a compilation is an error that names the program.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")
import jax.numpy as jnp  # noqa: E402
from piston.step.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from piston.step.sampling_params import SamplingParams  # noqa: E402
from piston.step.scheduler_output import NewRequestData, RunningRequestData, SchedulerOutput  # noqa: E402
from piston_tpu.model_runner import JaxModelRunner  # noqa: E402
from piston_tpu.recompile_detector import RecompileDetector, RecompileError  # noqa: E402

BLOCK = 16
PROMPT = [5, 17, 3, 99, 42, 8, 61, 23, 77, 2, 31, 64, 90, 11, 7, 50, 19, 88, 4, 36]  # 20 tokens


def _runner(monkeypatch, attention: str = "xla") -> JaxModelRunner:
    monkeypatch.setenv("PISTON_TPU_ATTENTION", attention)
    monkeypatch.setenv("PISTON_TPU_COMPILATION_CACHE", "0")
    hf = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  architectures=["LlamaForCausalLM"])
    config = EngineConfig(ModelConfig(model="tiny", load_format="dummy", max_model_len=64, hf_config=hf),
                          CacheConfig(block_size=BLOCK), SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4))
    runner = JaxModelRunner(config, on_tpu=False)
    runner.load_model()
    rng = np.random.default_rng(0)  # wide logits, so greedy tokens have no near-ties
    runner.params = {k: v if "norm" in k else jnp.asarray(rng.normal(0, 0.3, v.shape).astype(np.float32))
                     for k, v in runner.params.items()}
    runner.initialize_kv_cache(16)
    runner.warm_up()
    return runner


def _new(req_id: str, blocks: list[int], computed: int = 0) -> NewRequestData:
    return NewRequestData(req_id, PROMPT, [], SamplingParams(temperature=0.0, max_tokens=8), [blocks], computed, 2)


def _step(new=(), cached=(), num=None, finished=()) -> SchedulerOutput:
    cached = list(cached)
    data = RunningRequestData([c[0] for c in cached], [[c[1]] for c in cached], [c[2] for c in cached])
    return SchedulerOutput(list(new), data, dict(num), sum(num.values()), list(finished))


def _generate(runner: JaxModelRunner, req_id: str, chunks: list[int], steps: int) -> list[int]:
    """Prefill PROMPT in ``chunks`` then decode ``steps`` tokens; returns the sampled ids."""
    blocks, done, tokens = [0, 1], 0, []
    for i, n in enumerate(chunks):
        so = _step(new=[_new(req_id, blocks)] if i == 0 else (),
                   cached=[] if i == 0 else [(req_id, [], done)], num={req_id: n})
        out = runner.execute_model(so)
        done += n
        tokens += [t for ids in out.sampled_token_ids for t in ids]
    for _ in range(steps):
        out = runner.execute_model(_step(cached=[(req_id, [], done)], num={req_id: 1}))
        done += 1
        tokens += out.sampled_token_ids[0]
    runner.execute_model(_step(num={}, finished=[req_id]))
    return tokens


def test_chunked_prefill_gives_the_tokens_of_a_whole_prompt(monkeypatch):
    runner = _runner(monkeypatch)
    whole = _generate(runner, "a", [20], 6)
    chunked = _generate(runner, "b", [7, 9, 4], 6)
    assert len(whole) == 7 and chunked == whole


def test_pallas_kernel_and_xla_path_give_the_same_tokens(monkeypatch):
    xla = _generate(_runner(monkeypatch, "xla"), "a", [12, 8], 4)
    pallas = _generate(_runner(monkeypatch, "pallas"), "a", [12, 8], 4)
    assert pallas == xla


def test_steps_after_warm_up_compile_nothing(monkeypatch):
    runner = _runner(monkeypatch)
    compiled = runner.detector.num_compiles
    _generate(runner, "a", [20], 3)
    # Two requests in one step (a new prompt beside a decode) use other buckets, all warm.
    runner.execute_model(_step(new=[_new("b", [2, 3])], num={"b": 20}))
    runner.execute_model(_step(new=[_new("c", [4, 5])], cached=[("b", [], 20)], num={"b": 1, "c": 20}))
    assert runner.detector.num_compiles == compiled


def test_a_compilation_after_warm_up_fails_the_step_loudly(monkeypatch):
    runner = _runner(monkeypatch)
    jax.jit(lambda x: x * 3 + 1)(np.ones(5, np.float32))  # an eager op sneaking into the hot path
    with pytest.raises(RecompileError, match="after warm-up"):
        runner.execute_model(_step(new=[_new("a", [0, 1])], num={"a": 20}))


def test_detector_counts_but_allows_compiles_before_it_is_armed():
    with RecompileDetector() as detector:
        jax.jit(lambda x: x - 7)(np.ones(3, np.float32))
        detector.check()  # not armed: no error
        assert detector.num_compiles >= 1
        detector.arm()
        jax.jit(lambda x: x - 8)(np.ones(3, np.float32))
        with pytest.raises(RecompileError, match="lambda"):
            detector.check()
        detector.check()  # reported once

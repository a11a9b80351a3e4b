"""The Ray executor: TP=2 over Ray actors on a local loopback-only cluster gives the same
greedy tokens as TP=1, answers collective_rpc per rank, and fails cleanly when an actor dies."""

from __future__ import annotations

import os
import signal

import pytest

from piston import LLM, SamplingParams
from piston.engine.core_client import EngineDeadError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'piston[ray]')")

TP_KWARGS = dict(kv_cache_memory="32MiB", max_model_len=512, seed=0, dtype="float32",
                 tensor_parallel_size=2, distributed_executor_backend="ray")
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on loopback only; the engine process joins it via RAY_ADDRESS."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "PYTHONPATH")}
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ray.shutdown()


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_ray_tp2_greedy_tokens_equal_tp1(ray_cluster, tiny_models, make_llm):
    path = tiny_models("llama-uneven")
    expected = _tokens(make_llm(path, **dict(TP_KWARGS, tensor_parallel_size=1,
                                             distributed_executor_backend=None)))
    assert _tokens(make_llm(path, **TP_KWARGS)) == expected


def test_ray_tp2_smollm2_text_equals_tp1(ray_cluster, smollm2_path, smollm2_llm, make_llm, smollm2_llm_kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    expected = [o.outputs[0].text for o in smollm2_llm.generate(PROMPTS, params, use_tqdm=False)]
    llm = make_llm(smollm2_path, **dict(smollm2_llm_kwargs, tensor_parallel_size=2,
                                        distributed_executor_backend="ray"))
    assert [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)] == expected


def test_ray_collective_rpc_and_dead_actor(ray_cluster, tiny_models, call_with_deadline):
    llm = LLM(model=tiny_models("llama"), worker_extension_cls="tp_worker_ext:RankInfo", **TP_KWARGS)
    engine = llm.llm_engine
    try:
        info = llm.collective_rpc("rank_info")
        assert [i["rank"] for i in info] == [0, 1] and len({i["pid"] for i in info}) == 2
        os.kill(info[1]["pid"], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="Ray worker died unexpectedly"):
            call_with_deadline(lambda: llm.generate(PROMPTS, GREEDY, use_tqdm=False), 90)
    finally:
        engine.shutdown()

"""Tensor parallelism on the CPU (gloo, TP=2, the mp executor): head partitions, per-rank
RPCs and worker extensions, the per-step diff, and a dead worker ending the run instead of
a hang. TP=2 against TP=1 equality is in tests/conformance/test_tensor_parallel.py."""

from __future__ import annotations

import os
import signal
import time

import msgspec
import psutil
import pytest
from piston import LLM, SamplingParams
from piston.engine.core_client import EngineDeadError
from piston.step.tp_layout import head_partition, split_range
from piston.step.worker_messages import ExecuteModel

TP_KWARGS = dict(kv_cache_memory="32MiB", max_model_len=512, seed=0, dtype="float32")
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "1 2 3 4"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
HERE = os.path.dirname(__file__)


def _tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# ----- partitioning ----------------------------------------------------------------------


def test_split_range_covers_everything_once():
    for n in (1, 7, 128, 130):
        for tp in (1, 2, 3, 4):
            if n < tp:
                continue
            parts = [split_range(n, tp, r) for r in range(tp)]
            assert parts[0][0] == 0
            assert all(a[0] + a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert sum(c for _, c in parts) == n and max(c for _, c in parts) - min(c for _, c in parts) <= 1


def test_head_partition_splits_whole_kv_groups_unevenly():
    # SmolLM2: 9 q heads in 3 KV groups over 2 ranks -> 2 groups and 1 group.
    r0, r1 = (head_partition(9, 3, 2, r) for r in range(2))
    assert (r0.q_start, r0.num_heads, r0.kv_start, r0.num_kv_heads) == (0, 6, 0, 2)
    assert (r1.q_start, r1.num_heads, r1.kv_start, r1.num_kv_heads) == (6, 3, 2, 1)


def test_head_partition_replicates_kv_heads_when_fewer_than_ranks():
    parts = [head_partition(8, 2, 4, r) for r in range(4)]
    assert [(p.kv_start, p.num_kv_heads) for p in parts] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [(p.q_start, p.num_heads) for p in parts] == [(0, 2), (2, 2), (4, 2), (6, 2)]


def test_head_partition_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        head_partition(4, 2, 3, 0)
    with pytest.raises(ValueError, match="exceeds num_attention_heads"):
        head_partition(2, 1, 4, 0)


# ----- collective_rpc and worker extensions --------------------------------------------------


@pytest.fixture
def ext_env(monkeypatch):
    """Workers import the extension module by name: put this folder on their path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(HERE)


def test_collective_rpc_returns_one_result_per_rank(tiny_models, make_llm, ext_env):
    llm = make_llm(tiny_models("llama-uneven"), tensor_parallel_size=2,
                   worker_extension_cls="tp_worker_ext:RankInfo", **TP_KWARGS)
    info = llm.collective_rpc("rank_info")
    assert [i["rank"] for i in info] == [0, 1]
    assert all(i["world_size"] == 2 for i in info)
    assert len({i["pid"] for i in info}) == 2 and os.getpid() not in {i["pid"] for i in info}
    assert [i["num_kv_heads"] for i in info] == [2, 1]  # 3 KV heads split 2 + 1
    assert llm.collective_rpc("echo", ("x",), {"times": 2}) == [["x", "x"], ["x", "x"]]
    assert llm.collective_rpc("determine_num_kv_blocks")[0]["num_blocks"] > 0


def test_worker_extension_that_shadows_a_worker_method_is_rejected(tiny_models, tmp_path, monkeypatch):
    (tmp_path / "bad_ext.py").write_text("class Bad:\n    def execute_model(self, so):\n        return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PISTON_ENGINE_IN_PROCESS", "1")
    with pytest.raises(ValueError, match="redefines worker methods"):
        LLM(model=tiny_models("llama"), worker_extension_cls="bad_ext:Bad", **TP_KWARGS)


# ----- the per-step diff ---------------------------------------------------------------------


def test_decode_steps_broadcast_only_the_diff(tiny_models):
    """A decode step's broadcast carries no prompt or output tokens: its size does not grow
    with the prompts, and is a few bytes per running request."""
    from piston.core.request import Request
    from piston.core.scheduler import Scheduler
    from piston.engine.arg_utils import EngineArgs

    sizes = {}
    for prompt_len in (16, 400):
        config = EngineArgs(model=tiny_models("llama"), **TP_KWARGS).create_engine_config()
        config.cache_config.num_blocks = 4096
        scheduler = Scheduler(config)
        for i in range(64):
            scheduler.add_request(Request(request_id=f"req-{i}", prompt_token_ids=[5] * prompt_len,
                                          sampling_params=SamplingParams(max_tokens=50)))
        first = scheduler.schedule()
        assert msgspec.msgpack.encode(ExecuteModel(first)).count(b"\x05") >= 64  # prompts in full
        while first.scheduled_new_reqs or any(n > 1 for n in first.num_scheduled_tokens.values()):
            _advance(scheduler, first)
            first = scheduler.schedule()
        sizes[prompt_len] = len(msgspec.msgpack.encode(ExecuteModel(first)))
        assert len(first.num_scheduled_tokens) == 64 and first.total_num_scheduled_tokens == 64
    # 384 more prompt tokens per request add nothing but wider integers (computed counts).
    assert sizes[400] - sizes[16] <= 64 * 4, sizes
    assert max(sizes.values()) < 64 * 40, sizes


def _advance(scheduler, so) -> None:
    """Feed the scheduler what a runner would return: a token for each request whose prompt
    is complete after this step (num_computed_tokens already counts the step)."""
    from piston.step.runner_output import ModelRunnerOutput

    ids = list(so.num_scheduled_tokens)
    sampled = [[7] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_prompt_tokens
               else [] for r in ids]
    scheduler.update_from_output(so, ModelRunnerOutput(req_ids=ids, sampled_token_ids=sampled))


# ----- failures ------------------------------------------------------------------------------


def test_killed_worker_fails_in_flight_requests_without_hanging(tiny_models, ext_env, call_with_deadline):
    llm = LLM(model=tiny_models("llama"), tensor_parallel_size=2,
              worker_extension_cls="tp_worker_ext:RankInfo", **TP_KWARGS)
    engine = llm.llm_engine
    try:
        pids = [i["pid"] for i in llm.collective_rpc("rank_info")]
        for i in range(3):
            engine.add_request(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=200, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine.has_unfinished_requests()
        os.kill(pids[1], signal.SIGKILL)

        def run_to_end():
            while engine.has_unfinished_requests():
                engine.step()

        with pytest.raises(EngineDeadError, match=r"Worker rank 1 \(pid \d+\) died unexpectedly"):
            call_with_deadline(run_to_end, 60)
        # The engine shut the surviving worker down.
        deadline = time.monotonic() + 15
        while _running(pids[0]):
            assert time.monotonic() < deadline, "rank 0 was left running"
            time.sleep(0.1)
    finally:
        engine.shutdown()


def test_worker_start_up_error_is_reported(tiny_models, monkeypatch, call_with_deadline):
    # 3 KV heads cannot be shared by 4 ranks: the workers fail to build the model.
    monkeypatch.setenv("PISTON_ENGINE_IN_PROCESS", "1")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(Exception, match=r"cannot be shared by tensor_parallel_size=4"):
        call_with_deadline(lambda: LLM(model=tiny_models("llama-uneven"), tensor_parallel_size=4,
                                   **TP_KWARGS), 120)
    time.sleep(0.5)
    left = {p.pid for p in psutil.Process().children(recursive=True) if _running(p.pid)}
    assert left <= before, "worker processes were left running"


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (races with its exit are fine)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tp2_piecewise_compiled_equals_tp1_eager(tiny_models, make_llm, tmp_path):
    """The all-reduce is an opaque op, so a compiled TP model keeps its collectives."""
    path = tiny_models("qwen2")
    prompts = PROMPTS[:2]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = [o.outputs[0].token_ids for o in make_llm(path, **TP_KWARGS).generate(prompts, params, use_tqdm=False)]
    tp2 = make_llm(path, tensor_parallel_size=2, compilation_mode="piecewise",
                   compilation_cache_dir=str(tmp_path), **TP_KWARGS)
    assert [o.outputs[0].token_ids for o in tp2.generate(prompts, params, use_tqdm=False)] == expected

"""The engine in its own process: same tokens, utility calls, aborts, death and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest
from piston import LLM, SamplingParams
from piston.engine.core_client import EngineCoreClient, EngineDeadError
from piston.step.engine_messages import EngineCoreRequest

TINY_KWARGS = dict(kv_cache_memory="32MiB", max_model_len=256, seed=0, dtype="float32")
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _engine_pid(llm: LLM) -> int:
    return llm.llm_engine.engine_core.engine_pid


def _child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def tiny_llama(tiny_models) -> str:
    return tiny_models("llama")


@pytest.fixture(scope="module")
def mp_llm(tiny_llama):
    llm = LLM(model=tiny_llama, **TINY_KWARGS)
    yield llm
    llm.llm_engine.shutdown()


def test_engine_runs_in_its_own_process(mp_llm):
    pid = _engine_pid(mp_llm)
    assert pid != os.getpid()
    assert pid in _child_pids()
    assert psutil.Process(pid).is_running()


def test_multiprocess_greedy_tokens_match_in_process_engine(mp_llm, tiny_llama, monkeypatch):
    mp_tokens = [o.outputs[0].token_ids for o in mp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    monkeypatch.setenv("PISTON_ENGINE_IN_PROCESS", "1")
    inproc = LLM(model=tiny_llama, **TINY_KWARGS)
    try:
        assert _engine_pid(inproc) == os.getpid()
        in_tokens = [o.outputs[0].token_ids for o in inproc.generate(PROMPTS, GREEDY,
                                                                      use_tqdm=False)]
    finally:
        inproc.llm_engine.shutdown()
    assert mp_tokens == in_tokens
    assert all(len(t) == GREEDY.max_tokens for t in mp_tokens)


def test_utility_calls_report_all_blocks_free_after_requests_finish(mp_llm):
    engine = mp_llm.llm_engine
    mp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    total = engine.get_num_total_blocks()
    assert total == engine.config.cache_config.num_blocks > 0
    assert engine.get_num_free_blocks() == total
    assert engine.get_stats().num_running == 0
    with pytest.raises(RuntimeError, match="no_such_method"):
        engine.engine_core.call_utility("no_such_method")


def test_abort_frees_the_requests_blocks(mp_llm):
    engine = mp_llm.llm_engine
    total = engine.get_num_total_blocks()
    engine.add_request("long", "Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()  # at least one step ran, so the prompt holds blocks
    assert engine.get_num_free_blocks() < total
    engine.abort_request("long")
    assert not engine.has_unfinished_requests()
    assert engine.step() == []  # returns at once: nothing left to wait for
    # The abort was sent before this call on the same socket, so it is already applied.
    assert engine.get_num_free_blocks() == total


def test_killed_engine_raises_engine_dead_error_without_hanging(tiny_llama, call_with_deadline):
    llm = LLM(model=tiny_llama, **TINY_KWARGS)
    engine = llm.llm_engine
    try:
        os.kill(_engine_pid(llm), signal.SIGKILL)
        start = time.monotonic()

        def add_and_step():
            engine.add_request("r", "Hello", SamplingParams(max_tokens=50))
            return engine.step()

        with pytest.raises(EngineDeadError, match=r"exited with code -9"):
            call_with_deadline(add_and_step, 10)
        assert time.monotonic() - start < 5
        with pytest.raises(EngineDeadError):  # every later call fails the same way
            call_with_deadline(engine.get_num_free_blocks, 10)
    finally:
        engine.shutdown()


def test_startup_error_in_engine_raises_the_same_value_error(tiny_llama, call_with_deadline):
    kwargs = dict(TINY_KWARGS, kv_cache_memory="64KiB")
    before = _child_pids()
    with pytest.raises(ValueError, match=r"cannot hold one sequence of max_model_len=256") as mp:
        call_with_deadline(lambda: LLM(model=tiny_llama, **kwargs), 120)
    os.environ["PISTON_ENGINE_IN_PROCESS"] = "1"
    try:
        with pytest.raises(ValueError) as inproc:
            LLM(model=tiny_llama, **kwargs)
    finally:
        del os.environ["PISTON_ENGINE_IN_PROCESS"]
    assert str(mp.value) == str(inproc.value)
    assert _child_pids() <= before  # the failed engine process is gone


def test_shutdown_leaves_no_engine_process(tiny_llama):
    llm = LLM(model=tiny_llama, **TINY_KWARGS)
    pid = _engine_pid(llm)
    llm.generate("Hello", GREEDY, use_tqdm=False)
    start = time.monotonic()
    llm.llm_engine.shutdown()
    assert time.monotonic() - start < 10
    assert pid not in _child_pids()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    llm.llm_engine.shutdown()  # a second shutdown is harmless


def test_async_client_adds_requests_and_calls_utilities(tiny_llama):
    from piston.engine.arg_utils import EngineArgs

    client = EngineCoreClient.make_client(EngineArgs(model=tiny_llama, **TINY_KWARGS),
                                          asyncio_mode=True)

    async def run() -> tuple[list[int], int, int]:
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        await client.add_requests_async([EngineCoreRequest("a", [1, 2, 3, 4], params)])
        tokens: list[int] = []
        while True:
            outputs = await asyncio.wait_for(client.get_output_async(), 30)
            for out in outputs.outputs:
                tokens += out.new_token_ids
            if any(out.finish_reason for out in outputs.outputs):
                break
        free = await client.call_utility_async("get_num_free_blocks")
        total = await client.call_utility_async("get_num_total_blocks")
        return tokens, free, total

    try:
        tokens, free, total = asyncio.run(run())
    finally:
        client.shutdown()
    assert len(tokens) == 5
    assert free == total
    assert client.engine_pid not in _child_pids()

"""A failure tied to some requests fails those alone; the engine's state stays whole.

The scheduler's side (fail_step, a failing update), the KV cache's (blocks a failed step
registered are taken back out of the prefix cache) and the whole engine in this process
(a runner fault injected for one request of a batch).
"""

from __future__ import annotations

import pytest
from test_scheduler import make_request, make_scheduler

from piston.core.request import RequestStatus
from piston.step import fault_injection
from piston.step.runner_output import ModelRunnerOutput


@pytest.fixture
def inject(monkeypatch):
    def set_faults(spec: str) -> None:
        monkeypatch.setenv(fault_injection.ENV, spec)
        fault_injection._faults.cache_clear()

    yield set_faults
    fault_injection._faults.cache_clear()


def test_failed_step_fails_the_named_request_and_recomputes_the_others():
    sched = make_scheduler(num_blocks=32, block_size=4)
    a, b = make_request("a", 10), make_request("b", 6)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    outputs = sched.fail_step(out, ["a"], "boom")
    assert [(o.request_id, o.finish_reason, o.error) for o in outputs] == [("a", "error", "boom")]
    assert a.status == RequestStatus.FINISHED_ERROR and "a" not in sched.requests
    # b goes back to the front of the queue, to be recomputed from scratch as a new request.
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and not sched.running
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 32
    assert sched.num_preemptions == 0  # a recompute after a fault is not a preemption
    again = sched.schedule()
    assert {"a", "b"} <= set(again.finished_req_ids)  # the workers forget both
    assert [r.req_id for r in again.scheduled_new_reqs] == ["b"]


def test_a_failed_step_takes_its_blocks_back_out_of_the_prefix_cache():
    sched = make_scheduler(num_blocks=32, block_size=4)
    prompt = list(range(100, 112))  # three full blocks
    sched.add_request(make_request("a", prompt=prompt))
    out = sched.schedule()
    kv = sched.kv_cache_manager
    assert len(kv.block_pool.cached_block_hash_to_block) == 3  # full blocks registered at schedule time
    sched.fail_step(out, ["a"], "boom")
    # Their KV was never written: a later request with the same prompt must not hit them.
    assert not kv.block_pool.cached_block_hash_to_block
    sched.add_request(make_request("b", prompt=prompt))
    sched.schedule()
    assert sched.requests["b"].num_cached_tokens == 0


def test_a_request_whose_output_cannot_be_applied_fails_alone(inject):
    inject("scheduler:bad")
    sched = make_scheduler()
    for req_id in ("good", "bad"):
        sched.add_request(make_request(req_id, 5))
    out = sched.schedule()
    outputs = sched.update_from_output(out, ModelRunnerOutput(req_ids=["good", "bad"],
                                                              sampled_token_ids=[[7], [8]]))
    by_id = {o.request_id: o for o in outputs}
    assert by_id["good"].new_token_ids == [7] and by_id["good"].finish_reason is None
    assert by_id["bad"].finish_reason == "error" and "injected fault" in by_id["bad"].error
    assert [r.request_id for r in sched.running] == ["good"]


@pytest.mark.parametrize("stage", ["runner", "sampler"])
def test_offline_batch_keeps_every_other_prompt_when_one_fails(stage, inject, tiny_models, make_llm, monkeypatch):
    from piston import SamplingParams

    monkeypatch.setenv("PISTON_ENGINE_IN_PROCESS", "1")
    prompts = ["The river", "A lamp", "Seven clocks"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = make_llm(tiny_models("llama"), max_model_len=256, kv_cache_memory="8MiB")
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    inject(f"{stage}:4")  # this LLM's second batch has request ids 3, 4, 5
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outputs] == ["length", "error", "length"]
    assert "injected fault" in outputs[1].error
    assert [outputs[0].outputs[0].text, outputs[2].outputs[0].text] == [expected[0], expected[2]]
    engine = llm.llm_engine
    assert engine.get_num_free_blocks() == engine.get_num_total_blocks()

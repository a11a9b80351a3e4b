"""The scheduler with multi-LoRA (LoRAConfig.max_loras) and the prefix cache keyed by adapter,
driven without a model (tests/unit/test_scheduler.py's FakeWorker, its simulated KV cache
holding (adapter, token) pairs, so a request that reads another adapter's KV fails)."""

from __future__ import annotations

import random

import pytest
from test_scheduler import EOS, FakeWorker, assert_no_leak, make_config

from piston.core.block_hash import update_request_block_hashes
from piston.core.kv_cache_manager import KVCacheManager
from piston.core.request import Request
from piston.core.scheduler import Scheduler
from piston.step.config import LoRAConfig
from piston.step.lora_request import LoRARequest
from piston.step.sampling_params import SamplingParams

BS = 4


def lora(lora_id: int | None) -> LoRARequest | None:
    return None if lora_id is None else LoRARequest(f"adapter-{lora_id}", lora_id, f"/adapters/{lora_id}")


def make_lora_request(req_id: str, lora_id: int | None, prompt_len: int = 8, prompt=None, priority: int = 0,
                      **params) -> Request:
    params.setdefault("max_tokens", 4)
    prompt = list(range(100, 100 + prompt_len)) if prompt is None else prompt
    return Request(req_id, prompt, SamplingParams(**params), eos_token_id=EOS, priority=priority,
                   lora_request=lora(lora_id))


def make_lora_scheduler(max_loras: int = 2, **kwargs) -> Scheduler:
    kwargs.setdefault("block_size", BS)
    return Scheduler(make_config(**kwargs).replace(lora_config=LoRAConfig(max_loras=max_loras)))


def _adapter(request: Request) -> int | None:
    return request.lora_request.lora_int_id if request.lora_request is not None else None


def _adapters(requests) -> set[int]:
    return {_adapter(r) for r in requests} - {None}


class LoRAWorker(FakeWorker):
    """FakeWorker whose KV slots hold (adapter id, token): reading a block another adapter
    computed is a foreign read. Checks every step: at most max_loras adapters running and
    scheduled, and each new request carries its adapter to the runner."""

    def __init__(self, sched: Scheduler) -> None:
        super().__init__(sched)
        self.max_running_adapters = 0
        self.new_per_step: list[list[str]] = []

    def _check_kv_contents(self, out):
        """Called by FakeWorker.step between schedule() and update_from_output()."""
        sched = self.sched
        for new in out.scheduled_new_reqs:
            assert new.lora_request == sched.requests[new.req_id].lora_request
        scheduled = _adapters(sched.requests[r] for r in out.num_scheduled_tokens)
        running = _adapters(sched.running)
        assert len(scheduled) <= sched.max_loras, f"a step ran adapters {scheduled}"
        assert len(running) <= sched.max_loras, f"running requests hold adapters {running}"
        self.max_running_adapters = max(self.max_running_adapters, len(running))
        self.new_per_step.append([new.req_id for new in out.scheduled_new_reqs])
        bs = self.sched.kv_cache_manager.block_size
        for req_id, n in out.num_scheduled_tokens.items():
            r, blocks = self.sched.requests[req_id], self.state[req_id][0][0]
            for pos in range(r.num_computed_tokens - n, r.num_computed_tokens):
                self.slots[blocks[pos // bs] * bs + pos % bs] = (_adapter(r), r.all_token_ids[pos])
        for req_id in out.num_scheduled_tokens:
            r, blocks = self.sched.requests[req_id], self.state[req_id][0][0]
            seen = [self.slots[blocks[pos // bs] * bs + pos % bs] for pos in range(r.num_computed_tokens)]
            expected = [(_adapter(r), t) for t in r.all_token_ids[: r.num_computed_tokens]]
            assert seen == expected, f"{req_id} (adapter {_adapter(r)}) reads KV of another adapter or request"


# ----- max_loras -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("num_blocks", [400, 24], ids=["roomy", "preempting"])
def test_never_more_than_max_loras_adapters_run_and_all_finish(policy, num_blocks):
    rng = random.Random(0)
    sched = make_lora_scheduler(max_loras=2, num_blocks=num_blocks, budget=32, max_num_seqs=8, policy=policy)
    reqs = [make_lora_request(f"r{i}", rng.choice([None, 1, 2, 3, 4]), rng.randint(1, 40),
                              max_tokens=rng.randint(1, 12), priority=rng.randint(0, 3)) for i in range(40)]
    for r in reqs:
        sched.add_request(r)
    worker = LoRAWorker(sched)
    worker.run_to_completion()
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert worker.max_running_adapters == 2  # the bound was reached, not trivially kept
    if num_blocks == 24:
        assert sched.num_preemptions > 0
    assert_no_leak(sched)


def test_a_third_adapter_waits_while_others_are_admitted_behind_it():
    sched = make_lora_scheduler(max_loras=2, num_blocks=200, budget=256, max_num_seqs=16)
    order = [("a1", 1, 2), ("b1", 2, 10), ("c1", 3, 2), ("base1", None, 10), ("a2", 1, 2), ("b2", 2, 10),
             ("c2", 3, 2), ("base2", None, 10)]
    reqs = {rid: make_lora_request(rid, lora_id, max_tokens=n) for rid, lora_id, n in order}
    for r in reqs.values():
        sched.add_request(r)
    worker = LoRAWorker(sched)

    worker.step()  # everything fits the budget, but not a third adapter
    assert worker.new_per_step[0] == ["a1", "b1", "base1", "a2", "b2", "base2"]
    assert [r.request_id for r in sched.waiting] == ["c1", "c2"]
    worker.step()  # a1 and a2 finish (2 tokens each)
    assert reqs["a1"].is_finished() and reqs["a2"].is_finished()
    assert worker.new_per_step[1] == [] and len(sched.waiting) == 2
    worker.step()  # adapter 1 has no requests left: adapter 3's take its place
    assert worker.new_per_step[2] == ["c1", "c2"]
    assert _adapters(sched.running) == {2, 3}
    worker.run_to_completion()
    assert all(r.num_output_tokens == r.max_tokens for r in reqs.values())
    assert_no_leak(sched)


def test_a_request_of_a_running_adapter_is_admitted_while_a_new_adapter_waits():
    sched = make_lora_scheduler(max_loras=1, num_blocks=200, budget=256)
    sched.add_request(make_lora_request("a1", 1, max_tokens=6))
    worker = LoRAWorker(sched)
    worker.step()
    sched.add_request(make_lora_request("b1", 2, max_tokens=2))  # waits: one adapter at a time
    sched.add_request(make_lora_request("a2", 1, max_tokens=2))
    sched.add_request(make_lora_request("base", None, max_tokens=2))
    worker.step()
    assert worker.new_per_step[1] == ["a2", "base"]
    assert [r.request_id for r in sched.waiting] == ["b1"]
    worker.run_to_completion()
    assert "b1" in sum(worker.new_per_step, [])
    assert_no_leak(sched)


def test_lora_off_schedules_by_queue_order_alone():
    sched = Scheduler(make_config(block_size=BS, num_blocks=200, budget=256))
    assert sched.max_loras == 0
    for i in range(4):
        sched.add_request(make_lora_request(f"r{i}", i + 1))
    out = sched.schedule()
    assert [new.req_id for new in out.scheduled_new_reqs] == ["r0", "r1", "r2", "r3"]


def test_priority_order_holds_among_the_requests_that_fit():
    """The priority policy admits, of the waiting requests whose adapter fits, the one of the
    best priority, as it would without LoRA. (The waiting queue is a heap: iterating it is
    not its priority order.)"""
    sched = make_lora_scheduler(max_loras=2, num_blocks=200, budget=256, max_num_seqs=3, policy="priority")
    sched.add_request(make_lora_request("a", 1, max_tokens=10, priority=0))
    sched.add_request(make_lora_request("b", 2, max_tokens=10, priority=0))
    worker = LoRAWorker(sched)
    worker.step()
    # One seat left. c (adapter 3) cannot run; of the others y has the best priority.
    sched.add_request(make_lora_request("c", 3, priority=0))
    sched.add_request(make_lora_request("x", 1, priority=5))
    sched.add_request(make_lora_request("y", 2, priority=1))
    sched.add_request(make_lora_request("z", None, priority=3))
    worker.step()
    assert worker.new_per_step[1] == ["y"], f"admitted {worker.new_per_step[1]}, not y (priority 1)"


# ----- prefix cache keyed by adapter -----------------------------------------------------------


def test_same_tokens_under_different_adapters_hash_differently():
    tokens = list(range(1, 13))  # three full blocks
    hashes = {}
    for name, request in {"a": lora(1), "a-again": lora(1), "b": lora(2), "base": None,
                          "same-id-other-name": LoRARequest("other", 1, "/adapters/1")}.items():
        r = Request(name, tokens, SamplingParams(), lora_request=request)
        update_request_block_hashes(r, BS, r.block_hash_extra_keys)
        hashes[name] = r.block_hashes
        assert len(r.block_hashes) == 3
    assert hashes["a"] == hashes["a-again"]
    for other in ("b", "base", "same-id-other-name"):
        assert all(x != y for x, y in zip(hashes["a"], hashes[other])), other
    assert all(x != y for x, y in zip(hashes["b"], hashes["base"]))


def _prefill(kv: KVCacheManager, req: Request) -> int:
    hit, n_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - n_hit, hit, n_hit) is not None
    req.num_computed_tokens = req.num_tokens
    return n_hit


def test_kv_cache_manager_hits_only_blocks_of_the_same_adapter():
    kv = KVCacheManager(32, BS)
    tokens = list(range(1, 14))  # 13 tokens: 3 full blocks, 12 tokens can be hit
    assert _prefill(kv, Request("a", tokens, SamplingParams(), lora_request=lora(1))) == 0
    assert _prefill(kv, Request("b", tokens, SamplingParams(), lora_request=lora(2))) == 0
    assert _prefill(kv, Request("base", tokens, SamplingParams())) == 0
    assert _prefill(kv, Request("a2", tokens, SamplingParams(), lora_request=lora(1))) == 12
    assert _prefill(kv, Request("b2", tokens, SamplingParams(), lora_request=lora(2))) == 12
    assert _prefill(kv, Request("base2", tokens, SamplingParams())) == 12
    assert kv.get_block_ids("a2")[0][:3] == kv.get_block_ids("a")[0][:3]
    assert not set(kv.get_block_ids("a")[0]) & set(kv.get_block_ids("b")[0])
    assert not set(kv.get_block_ids("a")[0]) & set(kv.get_block_ids("base")[0])


def test_scheduler_never_shares_prefix_blocks_across_adapters():
    """The same 30-token prompt under adapters 1, 2, 3 and none (max_loras=2): each request
    reads only KV of its own adapter (LoRAWorker checks every step), and hits exactly the
    blocks its own adapter computed before."""
    sched = make_lora_scheduler(max_loras=2, num_blocks=200, budget=64, max_num_seqs=16)
    worker = LoRAWorker(sched)
    prompt = list(range(500, 530))
    full_hit = (len(prompt) - 1) // BS * BS

    def run(*names):
        reqs = [make_lora_request(f"{lora_id}-{k}", lora_id, prompt=list(prompt), max_tokens=3)
                for k, lora_id in names]
        for r in reqs:
            sched.add_request(r)
        worker.run_to_completion()
        return [r.num_cached_tokens for r in reqs]

    assert run((0, 1)) == [0]
    assert run((0, 2), (0, None)) == [0, 0]
    # Adapter 3 waits for a free adapter seat; each repeat hits all of its own adapter's blocks.
    assert run((1, 1), (1, 2), (0, 3), (1, None)) == [full_hit, full_hit, 0, full_hit]
    assert run((1, 3)) == [full_hit]
    assert_no_leak(sched)
    # All at once, in one queue: still no foreign KV (LoRAWorker), and every request finishes.
    assert len(run(*[(k, lora_id) for k in (2, 3) for lora_id in (1, 2, 3, None)])) == 8
    assert_no_leak(sched)


def test_a_waiting_adapter_is_not_starved_by_a_busy_one():
    """max_loras=1 and adapter 1 gets a new request every step: a request of adapter 2 at the
    head of the queue is passed over (adapter 1's later requests go first) for
    LORA_MAX_SKIPPED_STEPS steps; after that only base-model requests pass it, adapter 1's
    running requests drain, and it runs. Without the rule it would wait for ever."""
    from piston.core.scheduler import LORA_MAX_SKIPPED_STEPS

    sched = make_lora_scheduler(max_loras=1, num_blocks=400, budget=256, max_num_seqs=64)
    sched.add_request(make_lora_request("busy0", 1, max_tokens=8))
    worker = LoRAWorker(sched)
    worker.step()
    starved = make_lora_request("other", 2, max_tokens=4)
    sched.add_request(starved)
    admitted_at = None
    for step in range(1, 3 * LORA_MAX_SKIPPED_STEPS):
        sched.add_request(make_lora_request(f"busy{step}", 1, max_tokens=8))
        sched.add_request(make_lora_request(f"base{step}", None, max_tokens=2))
        worker.step()
        if starved.first_scheduled_time is not None:
            admitted_at = step
            break
        if step <= LORA_MAX_SKIPPED_STEPS:  # passed over: adapter 1's new request went ahead of it
            assert f"busy{step}" in worker.new_per_step[-1]
        else:  # only the base model's requests pass it now
            assert all(r.startswith("base") for r in worker.new_per_step[-1]), worker.new_per_step[-1]
    assert admitted_at is not None and admitted_at <= LORA_MAX_SKIPPED_STEPS + 10
    worker.run_to_completion()
    assert starved.num_output_tokens == 4
    assert_no_leak(sched)

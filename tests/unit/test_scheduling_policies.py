"""Scheduling policies: FCFS, priority (with preemption), fair sharing, custom classes, queue time."""

import time

import pytest
from piston.core.policies import FairPolicy, PriorityPolicy, SchedulingPolicy
from piston.core.request import RequestStatus
from piston.core.request_queue import PriorityRequestQueue
from piston.core.scheduler import Scheduler
from piston.engine.engine_core import load_scheduler_cls
from piston.step.config import SchedulerConfig
from test_scheduler import FakeWorker, assert_no_leak, make_config, make_request, make_scheduler


def admission_order(sched, max_steps=200):
    """Run to completion; the order in which requests were first admitted."""
    worker, order = FakeWorker(sched), []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return order
        out, _ = worker.step()
        order += [n.req_id for n in out.scheduled_new_reqs if n.req_id not in order]
    raise AssertionError("requests did not finish")


def run_collecting(sched, worker, max_steps=500):
    """Step to completion; the tokens each request was sent back."""
    produced = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return produced
        _, outs = worker.step()
        for o in outs:
            produced.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("requests did not finish")


# ---- FCFS ------------------------------------------------------------------------


def test_fcfs_is_the_default_and_admits_in_arrival_order():
    assert SchedulerConfig().policy == "fcfs"
    sched = make_scheduler(budget=100, max_num_seqs=1)
    assert type(sched.policy) is SchedulingPolicy
    for name, prio in [("first", 9), ("second", 0), ("third", 5)]:
        sched.add_request(make_request(name, 3, priority=prio, max_tokens=2))
    assert admission_order(sched) == ["first", "second", "third"]
    assert_no_leak(sched)


def test_fcfs_waiting_request_never_preempts_a_running_one():
    sched = make_scheduler(budget=100, max_num_seqs=1)
    worker = FakeWorker(sched)
    sched.add_request(make_request("old", 3, priority=9, max_tokens=5))
    worker.step()
    sched.add_request(make_request("urgent", 3, priority=0, max_tokens=5))
    out, _ = worker.step()
    assert list(out.num_scheduled_tokens) == ["old"] and sched.num_preemptions == 0


def test_unknown_policy_name_is_a_clear_error():
    with pytest.raises(ValueError, match="'fcfs', 'priority', 'fair'"):
        make_scheduler(policy="lottery")


# ---- priority --------------------------------------------------------------------


def test_priority_orders_by_priority_then_arrival():
    sched = make_scheduler(budget=100, max_num_seqs=1, policy="priority")
    assert isinstance(sched.policy, PriorityPolicy)
    for name, prio, t in [("c", 2, 1.0), ("a", 0, 3.0), ("b", 2, 0.5), ("d", 7, 0.1)]:
        sched.add_request(make_request(name, 3, priority=prio, arrival=t, max_tokens=1))
    assert admission_order(sched) == ["a", "b", "c", "d"]


def test_priority_arrival_preempts_low_priority_request_when_cache_is_full():
    sched = make_scheduler(num_blocks=5, block_size=4, budget=64, policy="priority")
    worker = FakeWorker(sched)
    low = make_request("low", 16, priority=9, arrival=1.0, max_tokens=4)  # needs all 5 blocks
    sched.add_request(low)
    worker.step()
    worker.step()  # low's first decode takes the 5th and last block
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 0
    high = make_request("high", 8, priority=0, arrival=2.0, max_tokens=3)
    sched.add_request(high)
    out, outs = worker.step()
    assert [n.req_id for n in out.scheduled_new_reqs] == ["high"]
    assert out.finished_req_ids == ["low"] and "low" not in out.num_scheduled_tokens
    assert low.status == RequestStatus.PREEMPTED and low.num_computed_tokens == 0
    tokens_before = list(low.output_token_ids)
    produced = run_collecting(sched, worker)
    assert high.num_output_tokens == 3 and outs[0].new_token_ids + produced["high"] == high.output_token_ids
    # low resumes with its output so far and still ends with exactly max_tokens tokens.
    assert low.status == RequestStatus.FINISHED_LENGTH and low.num_output_tokens == 4
    assert low.output_token_ids[: len(tokens_before)] == tokens_before
    assert produced["low"] == low.output_token_ids[len(tokens_before):]
    assert low.num_preemptions == 1
    assert_no_leak(sched)


def test_priority_arrival_preempts_when_max_num_seqs_is_reached():
    sched = make_scheduler(budget=64, max_num_seqs=1, policy="priority")
    worker = FakeWorker(sched)
    sched.add_request(make_request("low", 4, priority=5, arrival=1.0, max_tokens=4))
    worker.step()
    sched.add_request(make_request("high", 4, priority=1, arrival=2.0, max_tokens=4))
    out, _ = worker.step()
    assert list(out.num_scheduled_tokens) == ["high"] and out.finished_req_ids == ["low"]
    worker.run_to_completion()
    assert all(sched.requests.get(r) is None for r in ("low", "high"))
    assert_no_leak(sched)


def test_priority_equal_or_worse_arrival_does_not_preempt():
    sched = make_scheduler(budget=64, max_num_seqs=1, policy="priority")
    worker = FakeWorker(sched)
    sched.add_request(make_request("running", 4, priority=1, arrival=1.0, max_tokens=4))
    worker.step()
    sched.add_request(make_request("same", 4, priority=1, arrival=2.0, max_tokens=4))
    sched.add_request(make_request("worse", 4, priority=3, arrival=0.0, max_tokens=4))
    out, _ = worker.step()
    assert list(out.num_scheduled_tokens) == ["running"] and sched.num_preemptions == 0


# ---- fair ------------------------------------------------------------------------


def tokens_per_client(out, client_of):
    per = {}
    for req_id, n in out.num_scheduled_tokens.items():
        client = client_of[req_id]
        per[client] = per.get(client, 0) + n
    return per


@pytest.mark.parametrize("policy, light_tokens", [("fair", [16, 16, 16, 16, 16]), ("fcfs", [0, 0, 0, 0, 0])])
def test_fair_gives_a_light_client_half_the_budget_despite_a_long_queue(policy, light_tokens):
    sched = make_scheduler(num_blocks=400, budget=32, policy=policy)
    reqs = [make_request(f"heavy{i}", 40, arrival=float(i), client="heavy", max_tokens=3) for i in range(30)]
    reqs += [make_request(f"light{i}", 40, arrival=100.0 + i, client="light", max_tokens=3) for i in range(2)]
    for r in reqs:
        sched.add_request(r)
    client_of = {r.request_id: r.client_id for r in reqs}
    worker = FakeWorker(sched)
    got = []
    for _ in range(5):
        out, _ = worker.step()
        assert out.total_num_scheduled_tokens == 32  # sharing never wastes budget here
        got.append(tokens_per_client(out, client_of).get("light", 0))
    assert got == light_tokens
    worker.run_to_completion()
    assert_no_leak(sched)


def test_fair_share_of_a_client_that_needs_little_goes_to_the_others():
    sched = make_scheduler(num_blocks=400, budget=32, policy="fair")
    sched.add_request(make_request("big", 100, client="a", max_tokens=2))
    sched.add_request(make_request("small", 5, client="b", max_tokens=2))
    out, _ = FakeWorker(sched).step()
    assert out.num_scheduled_tokens == {"big": 27, "small": 5}


def test_fair_shares_running_slots_by_preempting_the_busiest_client():
    sched = make_scheduler(num_blocks=200, budget=64, max_num_seqs=4, policy="fair")
    assert isinstance(sched.policy, FairPolicy)
    worker = FakeWorker(sched)
    heavy = [make_request(f"h{i}", 4, arrival=float(i), client="heavy", max_tokens=20) for i in range(6)]
    for r in heavy:
        sched.add_request(r)
    worker.step()
    assert {r.client_id for r in sched.running} == {"heavy"} and sched.num_running == 4
    light = [make_request(f"l{i}", 4, arrival=10.0 + i, client="light", max_tokens=5) for i in range(2)]
    for r in light:
        sched.add_request(r)
    out, _ = worker.step()
    assert sorted(n.req_id for n in out.scheduled_new_reqs) == ["l0", "l1"]
    assert sorted(out.finished_req_ids) == ["h2", "h3"]  # the newest heavy requests
    assert sorted(r.request_id for r in sched.running) == ["h0", "h1", "l0", "l1"]
    out, _ = worker.step()  # two each: nobody preempts anybody any more
    assert out.finished_req_ids == [] and sched.num_preemptions == 2
    worker.run_to_completion()
    for r in heavy + light:
        assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.max_tokens
    assert heavy[2].num_preemptions == heavy[3].num_preemptions == 1
    assert_no_leak(sched)


def test_fair_with_one_client_is_first_come_first_served():
    sched = make_scheduler(budget=100, max_num_seqs=1, policy="fair")
    for name, t in [("x", 3.0), ("y", 1.0), ("z", 2.0)]:
        sched.add_request(make_request(name, 3, arrival=t, max_tokens=2))
    assert admission_order(sched) == ["x", "y", "z"]  # queue order, not arrival stamps


# ---- custom scheduler class ------------------------------------------------------


class ShortestPromptFirstPolicy(SchedulingPolicy):
    """Admit the shortest prompt first; otherwise FCFS."""

    name = "shortest-prompt-first"

    def make_queue(self):
        return PriorityRequestQueue(key=lambda r: r.num_prompt_tokens)


class ShortestPromptFirstScheduler(Scheduler):
    def make_policy(self, name):
        return ShortestPromptFirstPolicy()


def test_custom_scheduler_class_loads_by_import_path_and_applies_its_policy():
    path = f"{__name__}:ShortestPromptFirstScheduler"
    cls = load_scheduler_cls(path)
    assert cls is ShortestPromptFirstScheduler
    sched = cls(make_config(budget=100, max_num_seqs=1, policy=path))
    for name, n in [("long", 9), ("short", 2), ("mid", 5)]:
        sched.add_request(make_request(name, n, max_tokens=1))
    assert admission_order(sched) == ["short", "mid", "long"]
    assert_no_leak(sched)


def test_base_scheduler_named_by_path_starts_from_fcfs():
    sched = make_scheduler(policy="piston.core.scheduler:Scheduler")
    assert type(sched.policy) is SchedulingPolicy
    assert load_scheduler_cls("piston.core.scheduler:Scheduler") is Scheduler


# ---- queue time ------------------------------------------------------------------


def test_queue_time_reported_once_on_the_first_output_with_tokens():
    sched = make_scheduler(budget=8)
    arrival = time.monotonic() - 2.0
    req = make_request("r", 20, arrival=arrival, max_tokens=3)  # 3 chunks before a token
    sched.add_request(req)
    worker = FakeWorker(sched)
    outputs = []
    while sched.has_unfinished_requests():
        _, outs = worker.step()
        outputs += outs
    assert req.first_scheduled_time is not None and req.first_scheduled_time >= arrival
    assert outputs[0].new_token_ids
    assert outputs[0].queue_time == pytest.approx(req.first_scheduled_time - arrival)
    assert outputs[0].queue_time >= 2.0
    assert [o.queue_time for o in outputs[1:]] == [None, None]


@pytest.mark.parametrize("arrival", [0.0, time.monotonic() + 3600])
def test_queue_time_is_none_for_a_missing_or_future_arrival(arrival):
    sched = make_scheduler()
    sched.add_request(make_request("r", 3, arrival=arrival, max_tokens=1))
    _, outs = FakeWorker(sched).step()
    assert outs[0].new_token_ids and outs[0].queue_time is None


def test_first_scheduled_time_is_kept_across_preemption():
    sched = make_scheduler(num_blocks=5, block_size=4, budget=64, policy="priority")
    worker = FakeWorker(sched)
    low = make_request("low", 16, priority=9, max_tokens=4)
    sched.add_request(low)
    worker.step()
    first = low.first_scheduled_time
    worker.step()
    sched.add_request(make_request("high", 8, priority=0, max_tokens=3))
    worker.step()
    assert low.status == RequestStatus.PREEMPTED
    worker.run_to_completion()
    assert low.num_preemptions == 1 and low.first_scheduled_time == first

"""Scheduler: token budget, chunked prefill, preemption, policies, stop rules, the diff."""

import random
import zlib

import pytest
from piston.core.request import Request, RequestStatus
from piston.core.scheduler import Scheduler
from piston.step.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from piston.step.engine_messages import Logprobs
from piston.step.runner_output import ModelRunnerOutput
from piston.step.sampling_params import SamplingParams

EOS = 2


def make_scheduler(**kwargs):
    return Scheduler(make_config(**kwargs))


def make_config(num_blocks=64, block_size=4, budget=32, max_num_seqs=16, chunked=True,
                caching=True, policy="fcfs", max_model_len=0, max_prefill_tokens=None, hf_config=None):
    return EngineConfig(
        model_config=ModelConfig(model="fake", max_model_len=max_model_len, hf_config=hf_config),
        cache_config=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                         enable_chunked_prefill=chunked, policy=policy,
                                         max_prefill_tokens=max_prefill_tokens),
    )


def make_request(req_id, prompt_len=None, prompt=None, priority=0, arrival=None, client=None, **params):
    params.setdefault("max_tokens", 4)
    if prompt is None:
        prompt = [100 + (zlib.crc32(req_id.encode()) + i) % 1000 for i in range(prompt_len)]
    return Request(req_id, prompt, SamplingParams(**params), eos_token_id=EOS,
                   arrival_time=arrival, priority=priority, client_id=client)


def default_token(request):
    # Distinct per request and position, never EOS: keeps block hashes distinct.
    return 10_000 + request.num_output_tokens + 100 * (zlib.crc32(request.request_id.encode()) % 100)


def group_managers(kv):
    """One KVCacheManager per KV cache group (a hybrid manager's, or the manager itself)."""
    return kv.groups if hasattr(kv, "groups") else [kv]


class FakeWorker:
    """Mirrors the workers' cached request state from the diffs, and samples tokens."""

    def __init__(self, sched, token_fn=default_token):
        self.sched, self.token_fn = sched, token_fn
        self.state = {}  # req_id -> [block ids per group, num_computed_tokens]
        # Simulated KV cache: the token id whose KV each slot holds (a block is the same
        # memory whichever group holds it).
        kv = sched.kv_cache_manager
        self.slots = [None] * (kv.num_blocks * kv.block_size)

    def step(self, extra=None):
        sched = self.sched
        out = sched.schedule()
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        for req_id in out.finished_req_ids:
            self.state.pop(req_id, None)
        groups = group_managers(sched.kv_cache_manager)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.state
            assert len(new.block_ids) == len(groups)
            self.state[new.req_id] = [[list(ids) for ids in new.block_ids], new.num_computed_tokens]
        cached = out.scheduled_running_reqs
        for req_id, ids, n in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            assert len(ids) == len(groups) and len({len(g) for g in ids}) == 1
            for held, new_ids in zip(self.state[req_id][0], ids):
                held.extend(new_ids)
            self.state[req_id][1] = n
        req_ids, sampled = [], []
        for req_id, n in out.num_scheduled_tokens.items():
            r = sched.requests[req_id]
            group_blocks, computed = self.state[req_id]
            for g, blocks, mine in zip(groups, group_blocks, sched.kv_cache_manager.get_block_ids(req_id)):
                released = g.num_released.get(req_id, 0)  # sliding windows
                assert blocks[released:] == mine[released:]
                assert len(blocks) * g.block_size >= r.num_computed_tokens
            assert computed + n == r.num_computed_tokens <= r.num_tokens
            req_ids.append(req_id)
            sampled.append([self.token_fn(r)] if r.num_computed_tokens == r.num_tokens else [])
        self._check_kv_contents(out)
        runner_out = ModelRunnerOutput(req_ids, sampled, **(extra or {}))
        return out, sched.update_from_output(out, runner_out)

    def _check_kv_contents(self, out):
        """Write this step's tokens, then check every request attends to its own tokens.

        All writes come before any read, as each attention layer does; this is what makes
        a prefix hit on a block filled in the same step safe. With a sliding window W, the
        step's first query (position p) reads from p - W + 1 on, and only that is checked:
        the blocks before it may have been freed and overwritten. Every KV cache group writes
        and reads through its own block table.
        """
        bs = self.sched.kv_cache_manager.block_size
        groups = group_managers(self.sched.kv_cache_manager)
        for req_id, n in out.num_scheduled_tokens.items():
            r = self.sched.requests[req_id]
            for blocks in self.state[req_id][0]:
                for pos in range(r.num_computed_tokens - n, r.num_computed_tokens):
                    self.slots[blocks[pos // bs] * bs + pos % bs] = r.all_token_ids[pos]
        for req_id, n in out.num_scheduled_tokens.items():
            r = self.sched.requests[req_id]
            for g, blocks in zip(groups, self.state[req_id][0]):
                window = g.sliding_window
                first = 0 if window is None else max(0, r.num_computed_tokens - n - window + 1)
                seen = [self.slots[blocks[pos // bs] * bs + pos % bs] for pos in range(first, r.num_computed_tokens)]
                assert seen == r.all_token_ids[first: r.num_computed_tokens], f"{req_id} reads foreign KV"

    def run_to_completion(self, max_steps=1000):
        outs = []
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                return outs
            outs.append(self.step())
        raise AssertionError("requests did not finish")


def assert_no_leak(sched):
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == sched.kv_cache_manager.num_blocks
    assert all(b.ref_cnt == 0 for b in sched.kv_cache_manager.block_pool.blocks)


def test_budget_respected_every_step_and_all_finish():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=200, budget=16, max_num_seqs=5)
    reqs = [make_request(f"r{i}", rng.randint(1, 40), max_tokens=rng.randint(1, 10)) for i in range(20)]
    for r in reqs:
        sched.add_request(r)
    FakeWorker(sched).run_to_completion()
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    assert_no_leak(sched)


def test_chunked_prefill_splits_long_prompt_into_budget_sized_chunks():
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("long", 50, max_tokens=2))
    worker = FakeWorker(sched)
    chunks, outputs = [], []
    while sched.has_unfinished_requests():
        out, outs = worker.step()
        chunks.append(out.num_scheduled_tokens["long"])
        outputs.append(len(outs))
    assert chunks == [16, 16, 16, 2, 1]
    assert outputs == [0, 0, 0, 1, 1]  # prompt chunks sample nothing


def test_decode_and_prefill_mix_in_one_step():
    sched = make_scheduler(budget=16)
    worker = FakeWorker(sched)
    sched.add_request(make_request("a", 5, max_tokens=10))
    worker.step()
    sched.add_request(make_request("b", 30, max_tokens=10))
    out, _ = worker.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}
    assert [n.req_id for n in out.scheduled_new_reqs] == ["b"]
    assert out.scheduled_running_reqs.req_ids == ["a"]


def test_prefill_cap_prefills_simultaneous_prompts_one_after_another():
    # Four 8-token prompts arrive together: with a cap of 8 prompt tokens per step each one
    # gets its first token a step after the one before, and decodes are not counted.
    sched = make_scheduler(budget=64, max_prefill_tokens=8)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 8, max_tokens=6))
    worker = FakeWorker(sched)
    first_token_step = {}
    for step in range(4):
        out, outs = worker.step()
        assert sum(n for r, n in out.num_scheduled_tokens.items() if n > 1) <= 8
        for o in outs:
            first_token_step.setdefault(o.request_id, step)
        assert len(out.num_scheduled_tokens) == step + 1  # the earlier ones decode alongside
    assert first_token_step == {"r0": 0, "r1": 1, "r2": 2, "r3": 3}
    worker.run_to_completion()
    assert_no_leak(sched)


def test_prefill_cap_chunks_a_long_prompt_and_finishes_it_before_admitting_the_next():
    sched = make_scheduler(budget=64, max_prefill_tokens=8)
    sched.add_request(make_request("long", 20, max_tokens=3))
    sched.add_request(make_request("short", 4, max_tokens=3))
    worker = FakeWorker(sched)
    steps = [worker.step()[0].num_scheduled_tokens for _ in range(4)]
    assert steps == [{"long": 8}, {"long": 8}, {"long": 4, "short": 4}, {"long": 1, "short": 1}]


def test_prefill_cap_is_ignored_without_chunked_prefill():
    # A whole prompt larger than the cap must still be scheduled in one step.
    sched = make_scheduler(budget=32, chunked=False, max_prefill_tokens=8)
    sched.add_request(make_request("a", 20, max_tokens=2))
    out, _ = FakeWorker(sched).step()
    assert out.num_scheduled_tokens == {"a": 20}


def test_max_num_seqs_caps_running_requests():
    sched = make_scheduler(budget=100, max_num_seqs=2)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", 3))
    out, _ = FakeWorker(sched).step()
    assert len(out.num_scheduled_tokens) == 2
    assert sched.num_running == 2 and sched.num_waiting == 3


def test_chunked_prefill_disabled_schedules_whole_prompts_only():
    sched = make_scheduler(budget=16, chunked=False)
    sched.add_request(make_request("a", 10, max_tokens=5))
    sched.add_request(make_request("b", 10, max_tokens=5))
    worker = FakeWorker(sched)
    out, _ = worker.step()
    assert out.num_scheduled_tokens == {"a": 10}
    out, _ = worker.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 10}


def test_preemption_when_blocks_run_out_then_resume_with_outputs():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    reqs = [make_request(f"r{i}", 8, max_tokens=12) for i in range(2)]
    for r in reqs:
        sched.add_request(r)
    worker = FakeWorker(sched)
    produced = {r.request_id: [] for r in reqs}
    preempted_ids, resumed = set(), []
    while sched.has_unfinished_requests():
        out, outs = worker.step()
        preempted_ids |= {r.request_id for r in reqs if r.status == RequestStatus.PREEMPTED}
        resumed += [n for n in out.scheduled_new_reqs if n.output_token_ids]
        for o in outs:
            produced[o.request_id] += o.new_token_ids
    assert sched.make_stats().num_preemptions >= 1
    assert preempted_ids and resumed
    # A resumed request is rebuilt in full: prompt plus all output so far.
    assert resumed[0].num_computed_tokens < len(resumed[0].prompt_token_ids) + len(resumed[0].output_token_ids)
    for r in reqs:
        assert produced[r.request_id] == r.output_token_ids and r.num_output_tokens == 12
    assert_no_leak(sched)


def test_preempted_request_is_dropped_from_workers_in_the_same_step():
    sched = make_scheduler(num_blocks=3, block_size=4, budget=64)
    sched.add_request(make_request("a", 4, max_tokens=8))
    sched.add_request(make_request("b", 4, max_tokens=8))
    worker = FakeWorker(sched)
    worker.step()  # both prefill: 2 blocks
    out, _ = worker.step()  # both need a second block; only one is free
    assert out.finished_req_ids == ["b"] and list(out.num_scheduled_tokens) == ["a"]
    assert sched.requests["b"].status == RequestStatus.PREEMPTED
    assert sched.requests["b"].num_computed_tokens == 0


def test_priority_policy_serves_lowest_value_first():
    sched = make_scheduler(budget=100, max_num_seqs=1, policy="priority")
    for name, prio, t in [("late", 5, 0.0), ("urgent", 1, 1.0), ("mid", 3, 2.0), ("mid-later", 3, 3.0)]:
        sched.add_request(make_request(name, 3, priority=prio, arrival=t, max_tokens=1))
    order = []
    worker = FakeWorker(sched)
    while sched.has_unfinished_requests():
        out, _ = worker.step()
        order += [n.req_id for n in out.scheduled_new_reqs]
    assert order == ["urgent", "mid", "mid-later", "late"]


def test_priority_preemption_evicts_least_important_running_request():
    sched = make_scheduler(num_blocks=3, block_size=4, budget=64, policy="priority")
    sched.add_request(make_request("low", 4, priority=9, arrival=0.0, max_tokens=8))
    sched.add_request(make_request("high", 4, priority=0, arrival=1.0, max_tokens=8))
    worker = FakeWorker(sched)
    worker.step()
    out, _ = worker.step()
    assert list(out.num_scheduled_tokens) == ["high"]
    assert sched.requests["low"].status == RequestStatus.PREEMPTED
    worker.run_to_completion()
    assert_no_leak(sched)


def run_single(token_seq, **params):
    sched = make_scheduler()
    req = make_request("r", 3, **params)
    sched.add_request(req)
    tokens = iter(token_seq)
    worker = FakeWorker(sched, token_fn=lambda r: next(tokens))
    last = None
    while sched.has_unfinished_requests():
        _, outs = worker.step()
        last = outs[-1] if outs else last
    assert_no_leak(sched)
    return req, last


def test_eos_stops_with_no_stop_reason():
    req, last = run_single([5, EOS, 6], max_tokens=10)
    assert req.output_token_ids == [5, EOS]
    assert last.finish_reason == "stop" and last.stop_reason is None


def test_eos_ignored_before_min_tokens():
    req, _ = run_single([EOS, EOS, 7, EOS], max_tokens=10, min_tokens=3)
    assert req.output_token_ids == [EOS, EOS, 7, EOS]


def test_ignore_eos_runs_to_max_tokens():
    req, last = run_single([EOS] * 4, max_tokens=4, ignore_eos=True)
    assert req.num_output_tokens == 4 and last.finish_reason == "length"


def test_stop_token_id_sets_stop_reason_and_respects_min_tokens():
    req, last = run_single([9, 9, 8], max_tokens=10, stop_token_ids=[9], min_tokens=2)
    assert req.output_token_ids == [9, 9]
    assert last.finish_reason == "stop" and last.stop_reason == 9


def test_max_tokens_finishes_with_length():
    req, last = run_single([5] * 10, max_tokens=3)
    assert req.num_output_tokens == 3 and last.finish_reason == "length"


def test_max_model_len_finishes_with_length_and_caps_scheduling():
    sched = make_scheduler(max_model_len=6)
    req = make_request("r", 3, max_tokens=None)
    sched.add_request(req)
    outs = FakeWorker(sched).run_to_completion()
    assert req.num_tokens == 6 and req.status == RequestStatus.FINISHED_LENGTH
    assert all(o.total_num_scheduled_tokens <= 6 for o, _ in outs)


def test_abort_frees_blocks_and_is_reported_to_workers_not_outputs():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("running", 4, max_tokens=10))
    sched.add_request(make_request("chunking", 20, max_tokens=10))
    sched.add_request(make_request("waiting", 4, max_tokens=10))
    out = sched.schedule()
    sched.finish_requests(["running", "chunking", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED)
    sched.finish_requests("running", RequestStatus.FINISHED_ABORTED)  # already finished: ignored
    # The in-flight step's results for aborted requests are dropped.
    runner_out = ModelRunnerOutput(list(out.num_scheduled_tokens), [[5], []])
    assert sched.update_from_output(out, runner_out) == []
    assert not sched.has_unfinished_requests()
    assert_no_leak(sched)
    assert sorted(sched.schedule().finished_req_ids) == ["chunking", "running", "waiting"]


def test_prefix_hit_reported_in_num_cached_tokens():
    sched = make_scheduler(budget=64)
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks of 4
    worker = FakeWorker(sched)
    sched.add_request(make_request("first", prompt=prompt, max_tokens=1))
    _, outs = worker.step()
    assert outs[0].num_cached_tokens == 0
    sched.add_request(make_request("second", prompt=prompt, max_tokens=2))
    out, outs = worker.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 16
    assert out.num_scheduled_tokens == {"second": 2}
    assert outs[0].num_cached_tokens == 16
    _, outs = worker.step()
    assert outs[0].num_cached_tokens == 16
    assert sched.make_stats().prefix_cache_hit_rate == pytest.approx(16 / 36)


def test_common_prefix_blocks_counted_across_running_requests():
    sched = make_scheduler(budget=64)
    prefix = list(range(100, 108))
    sched.add_request(make_request("a", prompt=prefix + [1, 2], max_tokens=5))
    worker = FakeWorker(sched)
    worker.step()
    sched.add_request(make_request("b", prompt=prefix + [3, 4], max_tokens=5))
    out, _ = worker.step()
    assert out.num_common_prefix_blocks == 2


def test_logprobs_sliced_to_each_requests_k():
    sched = make_scheduler(budget=64)
    sched.add_request(make_request("one", 3, logprobs=1))
    sched.add_request(make_request("none", 3))
    sched.add_request(make_request("prompt", 3, prompt_logprobs=0))
    lp = Logprobs(token_ids=[[7, 1, 2, 3]] * 3, logprobs=[[-0.1, -0.2, -0.3, -0.4]] * 3, ranks=[1, 1, 1])
    prompt_lp = Logprobs(token_ids=[[5, 1], [6, 1]], logprobs=[[-1.0, -0.5], [-2.0, -0.5]], ranks=[2, 3])
    _, outs = FakeWorker(sched).step(extra={"logprobs": lp, "prompt_logprobs": {"prompt": prompt_lp}})
    by_id = {o.request_id: o for o in outs}
    assert by_id["one"].new_logprobs.token_ids == [[7, 1]]
    assert by_id["one"].new_logprobs.logprobs == [[-0.1, -0.2]]
    assert by_id["none"].new_logprobs is None
    assert by_id["prompt"].new_prompt_logprobs.token_ids == [[5], [6]]
    assert by_id["prompt"].new_prompt_logprobs.ranks == [2, 3]


def test_prompt_logprobs_reported_for_a_chunk_that_sampled_nothing():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("p", 20, prompt_logprobs=1))
    chunk_lp = Logprobs(token_ids=[[5, 1]] * 8, logprobs=[[-1.0, -0.5]] * 8, ranks=[1] * 8)
    _, outs = FakeWorker(sched).step(extra={"prompt_logprobs": {"p": chunk_lp}})
    assert len(outs) == 1 and outs[0].new_token_ids == [] and outs[0].new_prompt_logprobs is chunk_lp


def test_make_stats_reports_queue_and_cache_state():
    sched = make_scheduler(num_blocks=10, budget=100, max_num_seqs=1)
    sched.add_request(make_request("a", 8))
    sched.add_request(make_request("b", 8))
    sched.schedule()
    stats = sched.make_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (1, 1, 0)
    assert stats.kv_cache_usage == pytest.approx(0.2)


@pytest.mark.parametrize("max_prefill_tokens", [None, 5])
@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair"])
def test_random_workload_with_aborts_and_preemption_leaks_no_blocks(policy, max_prefill_tokens):
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=14, block_size=4, budget=24, max_num_seqs=6, policy=policy,
                           max_prefill_tokens=max_prefill_tokens)
    worker = FakeWorker(sched)
    shared = list(range(500, 512))
    reqs = []
    for step in range(300):
        if step < 150 and rng.random() < 0.4:
            prefix = shared if rng.random() < 0.5 else []
            prompt = prefix + [rng.randint(20, 90) for _ in range(rng.randint(1, 20))]
            r = make_request(f"r{step}", prompt=prompt, priority=rng.randint(0, 3),
                             client=rng.choice(["a", "b", "b", "b", None]), max_tokens=rng.randint(1, 12))
            reqs.append(r)
            sched.add_request(r)
        if reqs and rng.random() < 0.05:
            sched.finish_requests(rng.choice(reqs).request_id, RequestStatus.FINISHED_ABORTED)
        worker.step()
    worker.run_to_completion()
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.is_finished()
        if r.status == RequestStatus.FINISHED_LENGTH:
            assert r.num_output_tokens == r.max_tokens
    assert_no_leak(sched)


# ---- sliding windows ----------------------------------------------------------------------


def _mistral(window):
    """The config facts the scheduler reads: every layer slides over ``window`` tokens."""
    from types import SimpleNamespace

    return SimpleNamespace(model_type="mistral", num_hidden_layers=2, sliding_window=window)


def _run_tracking_held_blocks(sched, worker):
    """Runs to completion; the most blocks any request held (released places not counted)."""
    kv, most = sched.kv_cache_manager, 0
    while sched.has_unfinished_requests():
        worker.step()
        for r in sched.running:
            most = max(most, len(kv.req_to_blocks.get(r.request_id, ())) - kv.num_released.get(r.request_id, 0))
    return most


@pytest.mark.parametrize("caching", [True, False])
def test_sliding_window_frees_blocks_behind_the_window(caching):
    """Six 60-token prompts with 20 outputs each need 120 blocks of 4 if every block is kept;
    a window of 8 needs a few per request, so 40 blocks run all six without preempting, and
    each request reads only its own tokens within its window (the simulated KV), although the
    blocks it freed went to the others."""
    def workload():
        return [make_request(f"r{i}", 60, max_tokens=20) for i in range(6)]

    sched = make_scheduler(num_blocks=40, budget=16, caching=caching, hf_config=_mistral(8))
    assert sched.kv_cache_manager.sliding_window == 8
    reqs = workload()
    for r in reqs:
        sched.add_request(r)
    most = _run_tracking_held_blocks(sched, FakeWorker(sched))
    assert all(r.num_output_tokens == 20 for r in reqs)
    assert sched.num_preemptions == 0
    # The window's 8 positions span at most 3 blocks, plus the blocks of a 16-token chunk (4 or 5).
    assert most <= 8, most
    assert_no_leak(sched)

    full = make_scheduler(num_blocks=40, budget=16, caching=caching, hf_config=_mistral(None))
    assert full.kv_cache_manager.sliding_window is None
    for r in workload():
        full.add_request(r)
    assert _run_tracking_held_blocks(full, FakeWorker(full)) == 20  # every block of 80 tokens kept
    assert full.num_preemptions > 0
    assert_no_leak(full)


def test_sliding_window_keeps_released_blocks_as_prefix_hits_until_evicted():
    sched = make_scheduler(num_blocks=64, budget=64, hf_config=_mistral(8))
    prompt = [100 + i for i in range(40)]
    sched.add_request(make_request("a", prompt=prompt, max_tokens=3))
    worker = FakeWorker(sched)
    worker.step()  # the whole prompt: nothing released yet (released at the next step's start)
    worker.step()
    kv = sched.kv_cache_manager
    assert kv.num_released["a"] == (40 - 8 + 1) // 4  # blocks 0..7 end before position 33
    sched.add_request(make_request("b", prompt=prompt + [7, 7, 7], max_tokens=2))
    worker.run_to_completion()
    assert sched.requests == {} and kv.prefix_hits >= 40  # b's whole prompt prefix hit freed blocks
    assert_no_leak(sched)


def test_sliding_window_prefix_hit_needs_only_the_blocks_the_window_reaches():
    """Once the first blocks of a cached prompt are evicted, a plain prefix hit would stop at
    the first gap; with a window of 8 the hit runs to the prompt's end as long as the last two
    blocks of 4 (what position 40's window reaches back over) are cached."""
    sched = make_scheduler(num_blocks=24, budget=64, hf_config=_mistral(8))
    kv, worker = sched.kv_cache_manager, FakeWorker(sched)
    prompt = [100 + i for i in range(40)]
    sched.add_request(make_request("a", prompt=prompt, max_tokens=3))
    worker.run_to_completion()
    sched.add_request(make_request("filler", prompt=[5000 + i for i in range(60)], max_tokens=1))
    worker.run_to_completion()  # takes 16 blocks: 13 never used, then 3 of a's, freed first
    probe = make_request("probe", prompt=prompt + [7])
    from piston.core.block_hash import update_request_block_hashes

    update_request_block_hashes(probe, 4, probe.block_hash_extra_keys)
    cached = [kv.block_pool.get_cached_block(h) is not None for h in probe.block_hashes[:10]]
    assert not all(cached) and cached[8] and cached[9], cached  # a gap, but the window's blocks remain

    sched.add_request(make_request("c", prompt=prompt + [7, 7, 7], max_tokens=2))
    hits_before = kv.prefix_hits
    out, _ = worker.step()
    assert kv.prefix_hits - hits_before == 40 and out.num_scheduled_tokens["c"] == 3
    new = out.scheduled_new_reqs[0]
    # Blocks 8 and 9 are the hit's own; the eight before them are RELEASED places (id 0).
    assert new.num_computed_tokens == 40 and kv.num_released["c"] == 8
    assert new.block_ids[0][8:10] == [kv.block_pool.get_cached_block(h).block_id for h in probe.block_hashes[8:10]]
    worker.run_to_completion()  # the simulated KV: c reads its own tokens within its window
    assert_no_leak(sched)

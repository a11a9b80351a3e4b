"""Speculative decoding's parts, without a model: the n-gram proposer, the scheduler's
drafts and rollback, the positions' layout, and the rejection sampler's distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from chi_square import chi2_sf
import torch
from piston.core.request import Request
from piston.core.scheduler import Scheduler
from piston.step.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from piston.step.input_batch import InputBatch
from piston.step.ngram_proposer import NgramProposer
from piston.step.runner_output import ModelRunnerOutput
from piston.step.sampling_params import SamplingParams
from piston.step.scheduler_output import NewRequestData
from piston.step.spec_decode import SpecDecodeBatch
from piston.torch_runner.rejection_sampler import RejectionSampler
from piston.torch_runner.sampling_metadata import SamplingMetadata


# ----- the n-gram proposer --------------------------------------------------------------

def _propose(tokens, k=3, lo=2, hi=4):
    return NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=lo,
                                           prompt_lookup_max=hi)).propose_one(np.array(tokens))


def test_ngram_continues_the_earlier_occurrence():
    assert _propose([1, 2, 3, 4, 5, 6, 9, 9, 2, 3]) == [4, 5, 6]


def test_ngram_prefers_the_longest_match():
    # "3 4" occurs twice; only the second occurrence also matches the 3-gram "2 3 4".
    assert _propose([3, 4, 7, 7, 2, 3, 4, 8, 8, 1, 2, 3, 4]) == [8, 8, 1]


def test_ngram_prefers_the_latest_match_with_a_full_run():
    assert _propose([5, 6, 1, 1, 1, 5, 6, 2, 2, 2, 5, 6]) == [2, 2, 2]
    # The latest match has only one token after it: an earlier one with three wins.
    assert _propose([5, 6, 1, 1, 1, 7, 5, 6, 5, 6]) == [1, 1, 1]


def test_ngram_without_a_match_or_below_the_minimum_proposes_nothing():
    assert _propose([1, 2, 3, 4, 5]) == []
    assert _propose([1, 2, 9, 2], lo=2) == []  # only a 1-gram matches
    assert _propose([1, 2, 9, 2], lo=1) == [9, 2]
    assert _propose([7]) == []


# ----- the scheduler --------------------------------------------------------------------

def _scheduler(k=3, budget=64, max_model_len=0, disable=0):
    return Scheduler(EngineConfig(
        model_config=ModelConfig(model="fake", max_model_len=max_model_len),
        cache_config=CacheConfig(block_size=4, num_blocks=64),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16),
        speculative_config=SpeculativeConfig(num_speculative_tokens=k, disable_by_batch_size=disable)))


def _step(sched, sampled, proposed):
    """Schedule, then report ``sampled[req_id]`` tokens and ``proposed[req_id]`` drafts."""
    out = sched.schedule()
    ids = list(out.num_scheduled_tokens)
    result = ModelRunnerOutput(req_ids=ids, sampled_token_ids=[sampled.get(r, []) for r in ids],
                               spec_token_ids=[proposed.get(r, []) for r in ids])
    sched.update_from_output(out, result)
    return out


def test_scheduler_checks_drafts_and_takes_rejected_ones_back():
    sched = _scheduler(k=3)
    req = Request("a", list(range(10, 20)), SamplingParams(max_tokens=50), eos_token_id=2)
    sched.add_request(req)
    out = _step(sched, {"a": [100]}, {"a": [101, 102, 103]})
    assert out.num_scheduled_tokens == {"a": 10} and not out.scheduled_spec_decode_tokens
    assert req.spec_token_ids == [101, 102, 103]
    # Next step: the last token and three drafts; two accepted, then a correction.
    out = _step(sched, {"a": [101, 102, 7]}, {"a": [8, 9]})
    assert out.num_scheduled_tokens == {"a": 4}
    assert out.scheduled_spec_decode_tokens == {"a": [101, 102, 103]}
    assert req.output_token_ids == [100, 101, 102, 7]
    # 11 + 3 computed, one draft rejected: 13; the correction 7 is the next to compute.
    assert req.num_computed_tokens == 13 and req.num_tokens == 14
    assert len(sched.kv_cache_manager.get_block_ids("a")[0]) == 4  # slots for all 14 positions
    stats = sched.make_stats()
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens) == (1, 3, 2)
    assert stats.spec_accepted_per_pos == [1, 1, 0]
    out = _step(sched, {"a": [8]}, {})
    assert out.scheduled_spec_decode_tokens == {"a": [8, 9]}
    assert req.num_computed_tokens == 14 and req.output_token_ids[-1] == 8


def test_scheduler_trims_drafts_to_max_tokens_budget_and_context():
    sched = _scheduler(k=4, max_model_len=16)
    req = Request("a", list(range(10, 20)), SamplingParams(max_tokens=4), eos_token_id=2)
    sched.add_request(req)
    _step(sched, {"a": [100]}, {"a": [1, 2, 3, 4]})
    assert req.spec_token_ids == [1, 2]  # 1 out, 3 to go: two drafts and the bonus token
    sched = _scheduler(k=4, max_model_len=13)
    req = Request("b", list(range(10, 20)), SamplingParams(max_tokens=None), eos_token_id=2)
    sched.add_request(req)
    _step(sched, {"b": [100]}, {"b": [1, 2, 3, 4]})
    assert req.spec_token_ids == [1, 2]  # positions 11 and 12 are the context's last
    sched = _scheduler(k=4, budget=11)
    for r in ("c", "d"):
        sched.add_request(Request(r, list(range(10, 15)), SamplingParams(max_tokens=50), eos_token_id=2))
    _step(sched, {"c": [100], "d": [100]}, {"c": [1, 2, 3, 4], "d": [1, 2, 3, 4]})
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"c": 5, "d": 5} or out.num_scheduled_tokens == {"c": 5, "d": 6}
    assert out.total_num_scheduled_tokens <= 11
    assert all(len(d) == n - 1 for d, n in zip(out.scheduled_spec_decode_tokens.values(),
                                                out.num_scheduled_tokens.values()))


def test_scheduler_ignores_drafts_above_disable_by_batch_size():
    sched = _scheduler(k=2, disable=1)
    for r in ("a", "b"):
        sched.add_request(Request(r, list(range(10, 15)), SamplingParams(max_tokens=50), eos_token_id=2))
    _step(sched, {"a": [100], "b": [100]}, {"a": [1, 2], "b": [1, 2]})
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and not out.scheduled_spec_decode_tokens


def test_preemption_drops_the_drafts():
    sched = _scheduler(k=2)
    req = Request("a", list(range(10, 15)), SamplingParams(max_tokens=50), eos_token_id=2)
    sched.add_request(req)
    _step(sched, {"a": [100]}, {"a": [1, 2]})
    sched.preempt_all()
    assert req.spec_token_ids == [] and req.num_computed_tokens == 0


# ----- the layout -----------------------------------------------------------------------

def test_spec_decode_batch_lays_out_each_requests_positions():
    batch = InputBatch(4, 64, 16)
    for req_id, n in (("a", 5), ("b", 3)):
        batch.add_request(NewRequestData(req_id, list(range(1, n + 1)), [], SamplingParams(), [[0, 1]], 0))
    spec = {"a": [7, 8]}
    batch.write_drafts(spec)
    scheduled = batch.schedule({"a": 7, "b": 3}, 16)  # a: 5 prompt + 2 drafts; b: its prompt
    layout = SpecDecodeBatch.build(batch, scheduled, spec)
    assert layout.num_draft.tolist() == [2, 0]
    assert layout.logits_indices.tolist() == [4, 5, 6, 9]
    assert layout.draft_at_position.tolist() == [7, 8, -1, -1]
    assert layout.accepted_tokens(np.array([1, 0]), np.array([50, 60])) == [[7, 50], [60]]


# ----- the rejection sampler's distribution ------------------------------------------

def test_chi2_sf_matches_known_quantiles():
    assert chi2_sf(14.067, 7) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(2.167, 7) == pytest.approx(0.95, abs=1e-3)


def _metadata(num_rows: int, temperature: float, top_k: int | None = None) -> SamplingMetadata:
    t = torch.full((num_rows,), temperature)
    return SamplingMetadata(
        temperature=t, all_greedy=temperature == 0, all_random=temperature > 0, top_p=None,
        top_k=None if top_k is None else torch.full((num_rows,), top_k), min_p=None, generators={},
        max_num_logprobs=None, no_penalties=True, presence_penalties=torch.zeros(num_rows),
        frequency_penalties=torch.zeros(num_rows), repetition_penalties=torch.ones(num_rows),
        prompt_token_ids=None, output_token_ids=[[] for _ in range(num_rows)], min_tokens={})


def _layout(num_req: int, drafts: list[int]) -> SpecDecodeBatch:
    k = len(drafts)
    num_draft = np.full(num_req, k)
    cu = np.arange(num_req + 1) * (k + 1)
    request = np.repeat(np.arange(num_req), k + 1)
    offset = np.tile(np.arange(k + 1), num_req)
    return SpecDecodeBatch(num_draft, np.tile(np.array(drafts), num_req), np.arange(num_req * (k + 1)),
                           cu, request, offset)


# The same distribution at every position, so every token the sampler returns, accepted
# draft, residual sample or bonus, must be distributed as p.
_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize("drafts,top_k", [([0, 0], None), ([3, 1], None), ([7, 2], 5)])
def test_rejection_sampler_keeps_the_target_distribution(drafts, top_k):
    """Chi-square goodness of fit of the first and second returned tokens against p, over
    40,000 requests at a fixed seed. Each test has a false-failure rate of 1e-4 per seed
    (p-value threshold); the seed is fixed, so the outcome is reproducible."""
    torch.manual_seed(1234)
    num_req, k = 40_000, len(drafts)
    p = _LOGITS.clone()
    if top_k is not None:
        p[p.argsort(descending=True)[top_k:]] = float("-inf")
    p = p.softmax(-1).numpy()
    layout = _layout(num_req, drafts)
    logits = _LOGITS.repeat(num_req * (k + 1), 1)
    tokens, _ = RejectionSampler()(logits, _metadata(num_req * (k + 1), 1.0, top_k), layout, {})
    first = np.array([t[0] for t in tokens])
    second = np.array([t[1] for t in tokens if len(t) > 1], dtype=np.int64)
    support = p > 0
    if p[drafts[0]] == 0:  # a draft the target never samples is never accepted
        assert len(second) == 0
    for sample in (first, second) if len(second) else (first,):
        counts = np.bincount(sample, minlength=len(p))
        assert counts[~support].sum() == 0
        expected = p[support] * len(sample)
        stat = float(((counts[support] - expected) ** 2 / expected).sum())
        assert chi2_sf(stat, int(support.sum()) - 1) > 1e-4, (counts, expected)
    # Draft 0 is accepted with probability p(d0).
    accepted = np.array([len(t) > 1 for t in tokens]).mean()
    q = p[drafts[0]]
    assert accepted == pytest.approx(q, abs=4 * math.sqrt(q * (1 - q) / num_req) + 1e-9)


def test_greedy_rejection_keeps_the_argmax_and_accepts_matching_drafts():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0],
                           [0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    layout = SpecDecodeBatch(np.array([2, 2]), np.array([1, 0, 1, 2]), np.arange(6), np.array([0, 3, 6]),
                             np.repeat([0, 1], 3), np.tile([0, 1, 2], 2))
    tokens, _ = RejectionSampler()(logits, _metadata(6, 0.0), layout, {})
    assert tokens == [[1, 0, 2], [1, 0]]


def test_a_request_whose_drafts_keep_missing_backs_off():
    sched = _scheduler(k=2)
    req = Request("a", list(range(10, 15)), SamplingParams(max_tokens=200), eos_token_id=2)
    sched.add_request(req)
    _step(sched, {"a": [100]}, {"a": [1, 2]})
    checked = []
    for step in range(40):  # every run rejected whole: the drafts are checked less and less often
        out = _step(sched, {"a": [50 + step]}, {"a": [1, 2]})
        checked.append(bool(out.scheduled_spec_decode_tokens))
    assert [i for i, c in enumerate(checked) if c] == [0, 2, 6, 14, 30]
    # A run with an accepted draft ends the back-off.
    while not _step(sched, {"a": [90]}, {"a": [1, 2]}).scheduled_spec_decode_tokens:
        pass
    assert req.spec_misses == 6
    out = _step(sched, {"a": [91]}, {"a": [1, 2]})
    assert out.scheduled_spec_decode_tokens == {}  # still backing off ...
    sched.requests["a"].spec_skip_steps = 0  # ... skip to the next probe
    out = _step(sched, {"a": [1, 7]}, {"a": [1, 2]})
    assert out.scheduled_spec_decode_tokens == {"a": [1, 2]}
    assert req.spec_misses == 0 and req.spec_skip_steps == 0


def test_drafts_never_cost_a_preemption():
    """Drafts take KV blocks only when every running request can still grow by one."""
    sched = Scheduler(EngineConfig(
        model_config=ModelConfig(model="fake"), cache_config=CacheConfig(block_size=4, num_blocks=4),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16),
        speculative_config=SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=0)))
    for r in ("a", "b"):
        sched.add_request(Request(r, list(range(10, 14)), SamplingParams(max_tokens=50), eos_token_id=2))
    _step(sched, {"a": [100], "b": [100]}, {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]})
    # Two free blocks: a's four drafts would take both, and b needs one for its own token.
    out = _step(sched, {"a": [1], "b": [100]}, {})
    assert sched.num_preemptions == 0
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and not out.scheduled_spec_decode_tokens
    # With room to spare the drafts are checked.
    sched = _scheduler(k=4)
    sched.add_request(Request("c", list(range(10, 14)), SamplingParams(max_tokens=50), eos_token_id=2))
    _step(sched, {"c": [100]}, {"c": [1, 2, 3, 4]})
    assert _step(sched, {"c": [1]}, {}).scheduled_spec_decode_tokens == {"c": [1, 2, 3, 4]}

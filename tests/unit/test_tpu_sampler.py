"""The TPU platform's JAX sampler against the CPU platform's torch sampler.

Each processing stage (penalties, min_tokens, min_p, top-k/top-p, logprobs) must give the
torch sampler's numbers on random logits; sampling itself must respect greedy rows, be
keyed by (seed, tokens generated) only, and follow the filtered distribution.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
from piston.torch_runner import sampler as cpu  # noqa: E402
from piston.torch_runner.sampling_metadata import SamplingMetadata  # noqa: E402
from piston_tpu import sampler as tpu  # noqa: E402

VOCAB = 64
# Compiled once per shape, as the runner does; eager op-by-op dispatch would be slow.
_sample = jax.jit(tpu.sample)


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, VOCAB)) * 3).astype(np.float32)


def _inputs(rows, temperature=1.0, top_k=VOCAB, top_p=1.0, min_p=0.0, seeds=None, counters=None,
            step=0, logprobs=False) -> tpu.SamplingInputs:
    def full(v, dtype):
        return np.broadcast_to(np.asarray(v, dtype), (rows,)).copy()

    seeds_arr = np.zeros(rows, np.uint32) if seeds is None else np.asarray(seeds, np.uint32)
    temperature = full(temperature, np.float32)
    top_k, top_p, min_p = full(top_k, np.int32), full(top_p, np.float32), full(min_p, np.float32)
    return tpu.SamplingInputs(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds_arr,
        seeded=np.full(rows, seeds is not None), counters=full(0 if counters is None else counters, np.int32),
        step_key=np.array([0, step], np.uint32),
        flags=np.array([(temperature > 0).any(), (min_p > 0).any(), (top_k < VOCAB).any() or (top_p < 1).any(),
                        logprobs]))


def test_penalties_and_min_tokens_match_cpu_sampler():
    logits = _logits(3)
    outputs = [[1, 1, 5, 9], [], [3, 3, 3]]
    prompts = [[2, 5, 7], [8, 8, 1], [60]]
    presence = np.array([0.5, -1.0, 0.0], np.float32)
    frequency = np.array([0.3, 0.0, 1.5], np.float32)
    repetition = np.array([1.3, 0.8, 2.0], np.float32)
    min_tokens = {0: {4, 9}, 2: {63}}

    prompt_ids = torch.full((3, 3), VOCAB, dtype=torch.int64)
    for i, p in enumerate(prompts):
        prompt_ids[i, :len(p)] = torch.tensor(p)
    md = SamplingMetadata(
        temperature=torch.zeros(3), all_greedy=True, all_random=False, top_p=None, top_k=None, min_p=None,
        generators={}, max_num_logprobs=None, no_penalties=False,
        presence_penalties=torch.from_numpy(presence), frequency_penalties=torch.from_numpy(frequency),
        repetition_penalties=torch.from_numpy(repetition), prompt_token_ids=prompt_ids,
        output_token_ids=outputs, min_tokens=min_tokens)
    expected = cpu.apply_penalties(cpu.apply_min_tokens(torch.from_numpy(logits.copy()), min_tokens), md)

    counts = np.stack([np.bincount(np.asarray(o, np.int64), minlength=VOCAB) for o in outputs]).astype(np.int32)
    in_prompt = np.zeros((3, VOCAB), bool)
    forbidden = np.zeros((3, VOCAB), bool)
    for i, p in enumerate(prompts):
        in_prompt[i, p] = True
    for i, ids in min_tokens.items():
        forbidden[i, list(ids)] = True
    got = tpu.penalize(jnp.asarray(logits), counts, in_prompt, forbidden, presence, frequency, repetition)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k, top_p", [([5, 64, 1, 30], [1.0, 0.5, 1.0, 0.9]), ([64] * 4, [0.2, 0.7, 0.95, 1.0])])
def test_top_k_top_p_keep_the_same_tokens_as_cpu_sampler(top_k, top_p):
    logits = _logits(4, seed=1)
    expected = cpu.apply_top_k_top_p(torch.from_numpy(logits.copy()), torch.tensor(top_k), torch.tensor(top_p))
    got = tpu._apply_top_k_top_p(jnp.asarray(logits), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p))
    np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(expected.numpy()))
    kept = ~np.isinf(expected.numpy())
    np.testing.assert_array_equal(np.asarray(got)[kept], expected.numpy()[kept])


def test_min_p_keeps_the_same_tokens_as_cpu_sampler():
    logits = _logits(3, seed=2)
    min_p = np.array([0.0, 0.1, 0.5], np.float32)
    expected = cpu.apply_min_p(torch.from_numpy(logits.copy()), torch.from_numpy(min_p))
    got = tpu._apply_min_p(jnp.asarray(logits), jnp.asarray(min_p))
    np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(expected.numpy()))


def test_logprobs_chosen_token_rank_and_top_k_match_cpu_sampler():
    logits = _logits(5, seed=3)
    tokens = np.array([0, 7, 63, 12, 30], np.int32)
    expected = cpu.gather_logprobs(cpu.compute_logprobs(torch.from_numpy(logits)), tpu.MAX_DEVICE_LOGPROBS,
                                   torch.from_numpy(tokens.astype(np.int64)))
    got = tpu.logprobs_of(jnp.asarray(logits), jnp.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(got.token_ids), expected.token_ids.numpy())
    np.testing.assert_allclose(np.asarray(got.logprobs), expected.logprobs.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.ranks), expected.ranks.numpy())
    ids, values, ranks = tpu.host_logprobs(logits, tokens, tpu.MAX_DEVICE_LOGPROBS)
    np.testing.assert_array_equal(ids, expected.token_ids.numpy())
    np.testing.assert_allclose(values, expected.logprobs.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ranks, expected.ranks.numpy())


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = jnp.asarray(_logits(6, seed=4))
    temperature = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 0.5], np.float32)
    tokens, lp = _sample(logits, logits, _inputs(6, temperature=temperature, top_p=0.9, min_p=0.05))
    greedy = np.argmax(np.asarray(logits), axis=1)
    np.testing.assert_array_equal(np.asarray(tokens)[temperature == 0], greedy[temperature == 0])
    assert not np.asarray(lp.token_ids).any(), "logprobs are skipped unless a row asks"


def test_top_k_of_one_is_greedy():
    logits = jnp.asarray(_logits(8, seed=5))
    tokens, _ = _sample(logits, logits, _inputs(8, temperature=1.5, top_k=1))
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=1))


def test_seeded_draw_depends_on_seed_and_tokens_generated_not_on_the_batch():
    logits = jnp.asarray(np.zeros((8, VOCAB), np.float32))  # uniform: any token may come out
    alone, _ = _sample(logits[:1], logits[:1], _inputs(1, seeds=[42], counters=[3], step=7))
    seeds = [1, 2, 3, 4, 5, 42, 6, 7]
    batch, _ = _sample(logits, logits, _inputs(8, seeds=seeds, counters=[0, 0, 0, 0, 0, 3, 0, 0], step=9))
    assert int(np.asarray(batch)[5]) == int(np.asarray(alone)[0])
    later = [int(np.asarray(_sample(logits[:1], logits[:1], _inputs(1, seeds=[42], counters=[c]))[0])[0])
             for c in range(8)]
    assert len(set(later)) > 1, "each generated token must draw fresh noise"


def test_unseeded_rows_draw_fresh_noise_each_step():
    logits = jnp.asarray(np.zeros((8, VOCAB), np.float32))
    draws = {tuple(np.asarray(_sample(logits, logits, _inputs(8, step=s))[0]).tolist()) for s in range(4)}
    assert len(draws) == 4


def test_samples_follow_the_filtered_distribution():
    rows = 4000
    probs = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4))
    with np.errstate(divide="ignore"):
        logits = np.broadcast_to(np.log(probs).astype(np.float32), (rows, VOCAB))
    logits = jnp.asarray(logits)
    # top_p=0.75 keeps the smallest nucleus of mass >= 0.75: tokens 0 and 1, renormalized.
    tokens, _ = _sample(logits, logits, _inputs(rows, top_p=0.75, seeds=np.arange(rows)))
    freq = np.bincount(np.asarray(tokens), minlength=VOCAB)[:4] / rows
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


def _packed(allowed: np.ndarray) -> np.ndarray:
    """[rows, vocab] bools -> the grammar engines' packed int32 words (bit j of word w:
    token 32 * w + j)."""
    rows, vocab = allowed.shape
    padded = np.zeros((rows, (vocab + 31) // 32 * 32), bool)
    padded[:, :vocab] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def test_bitmask_masks_exactly_the_cleared_tokens_on_both_samplers():
    allowed = np.random.default_rng(3).random((4, VOCAB)) < 0.3
    allowed[:, 31] = allowed[:, 63] = True  # the sign bit of each word
    allowed[2] = True  # an unconstrained row: every bit set
    logits = _logits(4)
    expected = np.where(allowed, logits, -np.inf)
    np.testing.assert_array_equal(np.asarray(jax.jit(tpu.apply_bitmask)(logits, _packed(allowed))), expected)
    got = cpu.apply_token_bitmask(torch.from_numpy(logits.copy()), torch.from_numpy(_packed(allowed)))
    np.testing.assert_array_equal(got.numpy(), expected)
    # Only the constrained rows, by row number (as the torch runner passes them).
    some = torch.tensor([0, 3])
    got = cpu.apply_token_bitmask(torch.from_numpy(logits.copy()), torch.from_numpy(_packed(allowed)[[0, 3]]), some)
    np.testing.assert_array_equal(got.numpy()[[0, 3]], expected[[0, 3]])
    np.testing.assert_array_equal(got.numpy()[[1, 2]], logits[[1, 2]])


def test_a_zero_noise_draw_never_picks_a_masked_token(monkeypatch):
    # jax.random.exponential returns exactly 0 about once in 2^23 draws; 0/0 over a masked
    # token would be NaN, and argmax would pick it.
    monkeypatch.setattr(tpu.jax.random, "exponential", lambda key, shape, dtype: jnp.zeros(shape, dtype))
    allowed = np.zeros((2, VOCAB), bool)
    allowed[0, [5, 9]] = allowed[1, 40] = True
    logits = np.where(allowed, _logits(2), -np.inf).astype(np.float32)
    tokens, _ = jax.jit(tpu.sample)(logits, logits, _inputs(2, temperature=1.0))
    assert allowed[np.arange(2), np.asarray(tokens)].all()


# ----- speculative decoding: spec_verify and the host's rejection rule -------------------

_spec_verify = jax.jit(tpu.spec_verify)


def _spec_layout(num_req: int, drafts: list[int]):
    from piston.step.spec_decode import SpecDecodeBatch

    k = len(drafts)
    return SpecDecodeBatch(np.full(num_req, k), np.tile(np.array(drafts), num_req), np.arange(num_req * (k + 1)),
                           np.arange(num_req + 1) * (k + 1), np.repeat(np.arange(num_req), k + 1),
                           np.tile(np.arange(k + 1), num_req))


def test_spec_verify_keeps_the_target_distribution():
    """As the torch rejection sampler's test (tests/unit/test_spec_decode.py): the same
    logits at every position, so the first and second returned tokens are distributed as p.
    Chi-square at a 1e-4 false-failure rate, over 8,000 requests at fixed keys."""
    from chi_square import chi2_sf

    num_req, drafts = 8000, [3, 1]
    k = len(drafts)
    base = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0] + [-40.0] * (VOCAB - 8), np.float32)
    p = np.exp(base - base.max())
    p /= p.sum()
    layout = _spec_layout(num_req, drafts)
    n = num_req * (k + 1)
    inputs = _inputs(n, counters=layout.position_offset, step=3)
    greedy, sample, p_draft, uniform = (np.asarray(a) for a in _spec_verify(
        np.tile(base, (n, 1)), layout.draft_at_position.astype(np.int32), inputs))
    assert np.allclose(p_draft[layout.is_draft], p[layout.draft_at_position[layout.is_draft]], atol=1e-6)
    num_accepted = layout.count_accepted(np.zeros(n, bool), greedy, p_draft, uniform)
    final = sample[layout.final_positions(num_accepted)]
    tokens = layout.accepted_tokens(num_accepted, final)
    first = np.array([t[0] for t in tokens])
    second = np.array([t[1] for t in tokens if len(t) > 1])
    for s in (first, second):
        counts = np.bincount(s, minlength=VOCAB)[:8]
        assert np.bincount(s, minlength=VOCAB)[8:].sum() <= 2  # e^-40 mass: essentially never
        expected = p[:8] * len(s)
        keep = expected > 5
        stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        assert chi2_sf(stat, int(keep.sum()) - 1) > 1e-4, (counts, expected)


def test_spec_verify_greedy_rows_accept_matching_drafts():
    logits = _logits(4, seed=5)
    best = logits.argmax(axis=1)
    drafts = np.array([best[0], best[1] + 1, -1, -1], np.int32) % VOCAB
    drafts[2:] = -1
    greedy, sample, p_draft, uniform = (np.asarray(a) for a in _spec_verify(logits, drafts, _inputs(4, 0.0)))
    assert (greedy == best).all() and (sample == best).all()  # no random row: samples are the argmax

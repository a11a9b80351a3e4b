"""Sampling in JAX: from a padded batch of logits to one token per row.

The same parameters and order as the CPU sampler (piston.torch_runner.sampler):
1. raw logprobs = log_softmax(logits), before any processing (when a row asks);
2. min_tokens: forbid eos and stop tokens on rows still too short;
3. penalties: repetition (prompt + output), frequency and presence (output only);
4. greedy rows take the argmax of the penalized logits;
5. random rows: temperature, then min_p, top_k, top_p, then an exponential race.

Every function here has fixed shapes per request bucket and is compiled at warm-up.
Optional stages are ``lax.cond`` on flags passed as data, so one program per bucket
serves every mix of parameters. Steps 2-3 are a separate program (``penalize``), run
only when a row of the step needs them.

Randomness: a seeded request draws from fold_in(key(seed), number of tokens it has
generated), so its samples depend on its seed and history only, not on the batch, and
replay exactly after preemption; unseeded rows use the engine seed, the step and the row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_EPS = 1e-5
# Top-k logprobs computed on the device; a request asking for more is served on the host.
MAX_DEVICE_LOGPROBS = 20


class SamplingInputs(NamedTuple):
    """Per-row parameters [R] of one request bucket, and the batch's flags."""

    temperature: jax.Array  # float32, 0 on greedy rows
    top_k: jax.Array  # int32, vocab_size where unused
    top_p: jax.Array  # float32, 1 where unused
    min_p: jax.Array  # float32, 0 where unused
    seeds: jax.Array  # uint32
    seeded: jax.Array  # bool
    counters: jax.Array  # int32: tokens the request has generated so far
    step_key: jax.Array  # uint32 [2]: (engine seed, step number) for unseeded rows
    # bool [4]: any random row, any min_p, any top-k/top-p, any row wants logprobs.
    flags: jax.Array


class LogprobsArrays(NamedTuple):
    """Column 0 is the chosen token, then the top MAX_DEVICE_LOGPROBS tokens."""

    token_ids: jax.Array  # int32 [R, K + 1]
    logprobs: jax.Array  # float32 [R, K + 1]
    ranks: jax.Array  # int32 [R]


def gather_logprobs(logprobs: jax.Array, token_ids: jax.Array, k: int = MAX_DEVICE_LOGPROBS) -> LogprobsArrays:
    """The chosen token's logprob and rank (1 = most likely, ties count), and the top k."""
    top_lp, top_ids = lax.top_k(logprobs, k)
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=1)
    ranks = jnp.sum(logprobs >= chosen, axis=1, dtype=jnp.int32)
    return LogprobsArrays(jnp.concatenate((token_ids[:, None], top_ids.astype(jnp.int32)), axis=1),
                          jnp.concatenate((chosen, top_lp), axis=1), ranks)


def logprobs_of(logits: jax.Array, token_ids: jax.Array) -> LogprobsArrays:
    """Raw log-probabilities of ``token_ids`` (e.g. prompt tokens) and the top k."""
    return gather_logprobs(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token_ids)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """-inf where a row's packed int32 ``bitmask`` [R, ceil(V / 32)] has the token's bit
    clear (bit j of word w is token 32 * w + j): structured outputs' grammar masks."""
    bits = jnp.arange(32, dtype=jnp.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).astype(bool).reshape(bitmask.shape[0], -1)
    return jnp.where(allowed[:, :logits.shape[-1]], logits, -jnp.inf)


def penalize(logits: jax.Array, output_counts: jax.Array, in_prompt: jax.Array, forbidden: jax.Array,
             presence: jax.Array, frequency: jax.Array, repetition: jax.Array) -> jax.Array:
    """min_tokens (``forbidden`` -> -inf), then repetition, frequency and presence penalties.

    Repetition divides positive logits (multiplies negative ones) of every token seen in
    the prompt or the output; frequency subtracts penalty * output count; presence
    subtracts the penalty once for any token present in the output.
    """
    logits = jnp.where(forbidden, -jnp.inf, logits)
    counts = output_counts.astype(jnp.float32)
    in_output = output_counts > 0
    rep = repetition[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(in_output | in_prompt, penalized, logits)
    logits = logits - frequency[:, None] * counts
    # An extreme penalty (repetition 1e-300) overflows to +inf, which would make the softmax
    # NaN; the largest finite value keeps the row's order. -inf (forbidden) stays.
    return jnp.minimum(logits - presence[:, None] * in_output, jnp.finfo(logits.dtype).max)


def _apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = probs.max(axis=-1, keepdims=True) * min_p[:, None]
    return jnp.where(probs < threshold, -jnp.inf, logits)


def _apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep each row's k most likely tokens (exactly k, by sorted position), then its
    smallest nucleus of mass >= p; the most likely token always survives."""
    rows, vocab = logits.shape
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    positions = jnp.arange(vocab)[None, :]
    sorted_logits = jnp.where(positions < (vocab - top_k)[:, None], -jnp.inf, sorted_logits)
    cum_probs = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop = (cum_probs <= (1.0 - top_p)[:, None]) & (positions < vocab - 1)
    sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
    return jnp.zeros_like(logits).at[jnp.arange(rows)[:, None], order].set(sorted_logits)


def _row_keys(inputs: SamplingInputs) -> jax.Array:
    rows = inputs.seeds.shape[0]
    step = jax.random.fold_in(jax.random.key(inputs.step_key[0]), inputs.step_key[1])

    def key(seed, seeded, counter, row):
        own = jax.random.fold_in(jax.random.key(seed), counter)
        return lax.cond(seeded, lambda: own, lambda: jax.random.fold_in(step, row))

    return jax.vmap(key)(inputs.seeds, inputs.seeded, inputs.counters, jnp.arange(rows, dtype=jnp.uint32))


def _sample_random(logits: jax.Array, inputs: SamplingInputs) -> jax.Array:
    is_greedy = inputs.temperature < _EPS
    # Greedy rows get temperature 1 so the shared division stays finite.
    x = logits / jnp.where(is_greedy, 1.0, inputs.temperature)[:, None]
    x = lax.cond(inputs.flags[1], _apply_min_p, lambda a, _: a, x, inputs.min_p)
    x = lax.cond(inputs.flags[2], _apply_top_k_top_p, lambda a, *_: a, x, inputs.top_k, inputs.top_p)
    probs = jax.nn.softmax(x, axis=-1)
    noise = jax.vmap(lambda k: jax.random.exponential(k, (logits.shape[1],), jnp.float32))(_row_keys(inputs))
    # jax.random.exponential returns exactly 0 about once in 2^23 draws (a row of 49152
    # tokens: one step in 170). Over a token of probability 0 (masked by a grammar, cut by
    # top-k/top-p) that is 0/0 = NaN, which argmax picks: such a token must never win.
    noise = jnp.maximum(noise, jnp.finfo(jnp.float32).tiny)
    return jnp.argmax(probs / noise, axis=-1).astype(jnp.int32)


def sample(raw_logits: jax.Array, logits: jax.Array, inputs: SamplingInputs) -> tuple[jax.Array, LogprobsArrays]:
    """One token per row of ``logits`` (processed), logprobs from ``raw_logits``.

    Logprobs are zeros unless ``flags[3]``; greedy rows take the argmax in every case.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    random = lax.cond(inputs.flags[0], _sample_random, lambda *_: greedy, logits, inputs)
    tokens = jnp.where(inputs.temperature < _EPS, greedy, random)
    rows = logits.shape[0]
    k = MAX_DEVICE_LOGPROBS
    empty = LogprobsArrays(jnp.zeros((rows, k + 1), jnp.int32), jnp.zeros((rows, k + 1), jnp.float32),
                           jnp.zeros((rows,), jnp.int32))
    logprobs = lax.cond(inputs.flags[3], logprobs_of, lambda *_: empty, raw_logits, tokens)
    return tokens, logprobs


def spec_verify(logits: jax.Array, draft_ids: jax.Array, inputs: SamplingInputs
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Speculative decoding's decisions, one row per position of a SpecDecodeBatch (row i of
    ``inputs`` is that position's request, its counter the output length there).

    Returns per row: the argmax of the processed ``logits`` (greedy rows accept a draft
    equal to it, and take it after the last accepted draft); a sample from the processed
    distribution ``p`` without the row's draft (``draft_ids`` >= 0: the residual sampled at
    a rejection) or from ``p`` itself (``draft_ids`` -1: the bonus token); ``p(draft)``; and
    a uniform draw (a sampled row accepts its draft when it is below ``p(draft)``). The host
    combines them (SpecDecodeBatch.resolve). Seeded rows draw from fold_in(key(seed),
    counter), so the draws depend on the request's seed and history only.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rows, vocab = logits.shape

    def random_part(logits, draft_ids, inputs):
        is_greedy = inputs.temperature < _EPS
        x = logits / jnp.where(is_greedy, 1.0, inputs.temperature)[:, None]
        x = lax.cond(inputs.flags[1], _apply_min_p, lambda a, _: a, x, inputs.min_p)
        x = lax.cond(inputs.flags[2], _apply_top_k_top_p, lambda a, *_: a, x, inputs.top_k, inputs.top_p)
        probs = jax.nn.softmax(x, axis=-1)
        draft = jnp.maximum(draft_ids, 0)
        p_draft = jnp.take_along_axis(probs, draft[:, None], axis=1)[:, 0]
        keys = jax.vmap(jax.random.split)(_row_keys(inputs))
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys[:, 0])
        noise = jax.vmap(lambda k: jax.random.exponential(k, (vocab,), jnp.float32))(keys[:, 1])
        noise = jnp.maximum(noise, jnp.finfo(jnp.float32).tiny)  # see _sample_random
        is_draft = (jnp.arange(vocab)[None, :] == draft[:, None]) & (draft_ids >= 0)[:, None]
        residual = jnp.where(is_draft, 0.0, probs)
        return jnp.argmax(residual / noise, axis=-1).astype(jnp.int32), p_draft, u

    def greedy_only(logits, draft_ids, inputs):
        return greedy, jnp.zeros((rows,), jnp.float32), jnp.ones((rows,), jnp.float32)

    sample, p_draft, u = lax.cond(inputs.flags[0], random_part, greedy_only, logits, draft_ids, inputs)
    return greedy, sample, p_draft, u


def host_logprobs(logits: np.ndarray, token_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy gather_logprobs for k > MAX_DEVICE_LOGPROBS: (ids [N, k+1], logprobs, ranks)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    lp = (x - np.log(np.exp(x).sum(axis=1, keepdims=True))).astype(np.float32)
    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    chosen = lp[np.arange(len(lp)), token_ids]
    ranks = (lp >= chosen[:, None]).sum(axis=1)
    ids = np.concatenate((token_ids[:, None], top), axis=1)
    values = np.concatenate((chosen[:, None], np.take_along_axis(lp, top, axis=1)), axis=1)
    return ids, values, ranks

"""Speculative decoding (issue 17): drafts change how fast tokens come, never which.

- Greedy: the tokens with speculation equal transformers' greedy tokens (tiny models,
  drafts from an oracle proposer) and the engine's own without speculation (SmolLM2, n-gram
  drafts), also with a 16-token budget (chunked prefill) and prefix caching off, and with a
  KV cache small enough to preempt. Every case also checks that drafts were both accepted
  and rejected, so the speculative path really ran.
- Logprobs: those of the target model (equal to the non-speculative run's).
- Sampling: a seeded request repeats itself, and the distribution of sampled tokens with
  speculation equals the one without (a two-sample chi-square test).
- Draft models: greedy tokens equal transformers' (tiny models) and the engine's own
  without speculation (SmolLM2), drafted by the first layers of the target itself (its
  embeddings, final norm and head kept): a draft that agrees with the target part of the
  time, so drafts are accepted and rejected. EAGLE-1 and EAGLE-3 heads: a random head
  drafts, and the tokens are transformers'.

Runs where the platform has speculative decoding (supports_speculative); elsewhere it
skips, saying so.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from chi_square import chi2_sf
from hf_reference import LONG_PROMPT, REFERENCE_PROMPTS, assert_no_near_ties, hf_config, hf_greedy
from marks import SLOW_ON_TPU
from piston import SamplingParams
from piston.hal.registry import get_platform
from reference import reference

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
NGRAM = dict(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=4,
             disable_by_batch_size=0)
TINY_MODELS = ["llama", "qwen2", "qwen3"]
DRAFT = dict(method="draft_model", num_speculative_tokens=4, disable_by_batch_size=0)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _needs_speculation():
    platform = get_platform(None)
    if not platform.supports_speculative:
        pytest.skip(f"platform {platform.name} has no speculative decoding yet (supports_speculative=False)")


def _tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


def _assert_speculated(llm) -> None:
    """Drafts were checked, and some accepted and some rejected."""
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > 0, "no draft was checked"
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens, stats


@pytest.fixture(scope="session")
def truncated_model(tmp_path_factory, smollm2_path):
    """Factory: ``truncated_model(path, n)`` -> an HF folder with the first n layers of the
    model ``path`` (built once per session by transformers)."""
    built: dict[tuple[str, int], str] = {}

    def get(path: str, num_layers: int) -> str:
        if (path, num_layers) not in built:
            folder = tmp_path_factory.mktemp(f"draft-{num_layers}-layers")
            built[path, num_layers] = reference().build_truncated_model(path, str(folder), num_layers, smollm2_path)
        return built[path, num_layers]

    return get


@pytest.fixture(autouse=True)
def _needs_draft_models(request):
    platform = get_platform(None)
    for method in ("draft_model", "eagle3", "eagle"):
        if method in request.node.name:
            if method not in platform.draft_methods:
                pytest.skip(f"platform {platform.name} cannot run method {method} yet (its draft_methods: "
                            f"{platform.draft_methods})")
            break


@pytest.fixture(scope="module")
def baseline(smollm2_llm) -> list[list[int]]:
    return _tokens(smollm2_llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_greedy_with_speculation_matches_hf(name, tiny_models, make_llm, smollm2_tokenizer,
                                                       tmp_path, monkeypatch):
    """Random models rarely repeat themselves, so n-gram drafts would be few (SmolLM2 below
    is their case); the oracle proposer drafts transformers' own continuation, wrong at
    every other run's third draft, so drafts are accepted and rejected in the middle of
    runs, in a batch with chunked prefill."""
    path = tiny_models(name)
    prompts = REFERENCE_PROMPTS + [LONG_PROMPT]  # Alice three times: lookups find long runs
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in prompts]
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)
    table = tmp_path / "oracle.json"
    table.write_text(json.dumps([[ids, r.token_ids] for ids, r in zip(prompt_ids, reference)]))
    monkeypatch.setenv("PISTON_TEST_ORACLE", str(table))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    config = {**NGRAM, "method": "oracle_proposer:OracleProposer"}
    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32",
                   max_num_batched_tokens=256, speculative_config=config)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == [r.token_ids for r in reference]
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens > 100, stats


def _check_smollm2_variant(variant, speculative_config, baseline, make_llm, smollm2_path, smollm2_llm_kwargs,
                           draft_layers: int = 0, random_drafts: bool = False) -> None:
    """Greedy tokens with speculation equal ``baseline``: "default"; "budget16_no_prefix_caching"
    (chunked prefill, every prompt computed in full); "preemption" (16 blocks, one full
    context, for a batch that needs ~60; a draft model's ``draft_layers`` share the blocks).
    Drafts were checked, and (unless ``random_drafts``) some accepted and some rejected."""
    kwargs = {**smollm2_llm_kwargs, "speculative_config": speculative_config}
    if variant == "budget16_no_prefix_caching":
        kwargs.update(max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts, expected = REFERENCE_PROMPTS, baseline
    if variant == "preemption":
        config = hf_config(smollm2_path)
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        layers = config["num_hidden_layers"] + draft_layers
        per_token = 2 * layers * config["num_key_value_heads"] * head_dim * 4
        kwargs.update(kv_cache_memory=16 * 16 * per_token, max_model_len=256)
        prompts, expected = REFERENCE_PROMPTS * 2, baseline * 2
    llm = make_llm(smollm2_path, **kwargs)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    if random_drafts:
        assert llm.llm_engine.get_stats().spec_num_draft_tokens > 0
    else:
        _assert_speculated(llm)
    if variant == "preemption":
        assert llm.llm_engine.get_num_preemptions() > 0


@pytest.mark.parametrize("variant", ["default", "budget16_no_prefix_caching",
                                     pytest.param("preemption", marks=SLOW_ON_TPU)])  # 22 s on the TPU plugin
def test_smollm2_greedy_with_ngram_matches_without(variant, baseline, make_llm, smollm2_path, smollm2_llm_kwargs):
    _check_smollm2_variant(variant, NGRAM, baseline, make_llm, smollm2_path, smollm2_llm_kwargs)


@pytest.mark.parametrize("name", ["llama", pytest.param("qwen3", marks=pytest.mark.slow)])
def test_tiny_model_greedy_with_draft_model_matches_hf(name, tiny_models, truncated_model, make_llm,
                                                       smollm2_tokenizer):
    """Drafts from the target's first layer, in a batch with chunked prefill (a 64-token
    budget: prompts are computed over several steps, and the draft model catches up chunk
    by chunk) and prefix caching."""
    path = tiny_models(name)
    prompts = REFERENCE_PROMPTS + [LONG_PROMPT]
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in prompts]
    reference_out = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference_out)
    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32",
                   max_num_batched_tokens=64, speculative_config={**DRAFT, "model": truncated_model(path, 1)})
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == [r.token_ids for r in reference_out]
    _assert_speculated(llm)


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_tiny_model_greedy_with_an_eagle_head_matches_hf(method, tiny_models, make_llm, smollm2_tokenizer, tmp_path):
    """A random EAGLE-1 or EAGLE-3 head in the published layout (its outputs against
    references: tests/unit/test_eagle.py): whatever it drafts, the tokens are the target's,
    in a batch with chunked prefill and prefix caching."""
    path = tiny_models("llama")
    if method == "eagle":
        head = reference().build_eagle_head(path, str(tmp_path / "eagle"), 1, True, 0)
    else:
        head = reference().build_eagle3_head(path, str(tmp_path / "eagle3"), 4096, False, False, None, 0)
    prompts = REFERENCE_PROMPTS + [LONG_PROMPT]
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in prompts]
    reference_out = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference_out)
    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32",
                   max_num_batched_tokens=64, speculative_config={**DRAFT, "method": method, "model": head})
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == [r.token_ids for r in reference_out]
    assert llm.llm_engine.get_stats().spec_num_draft_tokens > 0


# All slow (30 s on the CPU, a minute on the TPU plugin each: nox -s slow); the tiny draft-model
# and EAGLE cases above keep draft models in the default suite.
@pytest.mark.parametrize("variant", [pytest.param("default", marks=pytest.mark.slow),
                                     pytest.param("budget16_no_prefix_caching", marks=pytest.mark.slow),
                                     pytest.param("preemption", marks=pytest.mark.slow)])
def test_smollm2_greedy_with_draft_model_matches_without(variant, baseline, make_llm, smollm2_path,
                                                         smollm2_llm_kwargs, truncated_model):
    """SmolLM2 drafted by its first 24 layers (of 30), in float32."""
    config = {**DRAFT, "model": truncated_model(smollm2_path, 24)}
    _check_smollm2_variant(variant, config, baseline, make_llm, smollm2_path, smollm2_llm_kwargs, draft_layers=24)


@pytest.mark.slow  # about 20 s each on the CPU, a minute on the TPU plugin: nox -s slow
@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_smollm2_greedy_with_an_eagle_head_matches_without(method, baseline, make_llm, smollm2_path,
                                                           smollm2_llm_kwargs, tmp_path):
    """SmolLM2 with a random EAGLE-1 or EAGLE-3 head, in a KV cache small enough to preempt
    (the head's layer shares the blocks): the tokens are the engine's own without it."""
    folder = str(tmp_path / method)
    if method == "eagle":
        head = reference().build_eagle_head(smollm2_path, folder, 1, False, 0)
    else:
        head = reference().build_eagle3_head(smollm2_path, folder, 4096, False, False, None, 0)
    _check_smollm2_variant("preemption", {**DRAFT, "method": method, "model": head}, baseline, make_llm,
                           smollm2_path, smollm2_llm_kwargs, draft_layers=1, random_drafts=True)


def test_ngram_logprobs_are_the_target_models(smollm2_llm, make_llm, smollm2_path, smollm2_llm_kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3)
    prompts = REFERENCE_PROMPTS[6:9]
    plain = smollm2_llm.generate(prompts, params, use_tqdm=False)
    llm = make_llm(smollm2_path, **smollm2_llm_kwargs, speculative_config=NGRAM)
    spec = llm.generate(prompts, params, use_tqdm=False)
    _assert_speculated(llm)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(b.outputs[0].logprobs) == len(b.outputs[0].token_ids)
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert pa.keys() == pb.keys()
            for tok in pa:  # a multi-token forward vs one token at a time: float32 rounding
                assert pb[tok].logprob == pytest.approx(pa[tok].logprob, abs=1e-4)
                assert pb[tok].rank == pa[tok].rank


# Ten words three times over: SmolLM2 continues the list, and lookups find drafts.
_WORDS = "apple river stone cloud lamp tiger honey violin marble rocket"
COPY_PROMPT = f"{_WORDS}, {_WORDS}, {_WORDS}, apple river stone"


@SLOW_ON_TPU  # 19 s on the TPU plugin, 6 s on the CPU
def test_seeded_sampling_with_ngram_is_reproducible(make_llm, smollm2_path, smollm2_llm_kwargs):
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=32, seed=7, ignore_eos=True)
    llm = make_llm(smollm2_path, **smollm2_llm_kwargs, speculative_config=NGRAM)
    first = llm.generate([COPY_PROMPT], params, use_tqdm=False)
    # Alone again, and inside a batch of others: the same tokens.
    again = llm.generate([REFERENCE_PROMPTS[1], COPY_PROMPT, REFERENCE_PROMPTS[2]], params, use_tqdm=False)
    assert _tokens(first)[0] == _tokens(again)[1]
    assert llm.llm_engine.get_stats().spec_num_accepted_tokens > 0


@pytest.mark.slow  # 600 requests per side, about 45 s on the CPU and a minute on the TPU plugin: nox -s slow
def test_sampled_distribution_with_ngram_matches_without(make_llm, smollm2_path, smollm2_llm_kwargs):
    """Two-sample chi-square test of homogeneity on the 2nd to 4th sampled tokens (drafts
    decide those), 600 requests each way at temperature 0.8 on SmolLM2. Tokens seen fewer
    than 10 times in all are pooled into one bin. The p-value threshold 1e-3 is the test's
    false-failure rate per seed; the seeds are fixed, so the outcome is reproducible."""
    params = SamplingParams(temperature=0.8, max_tokens=4, ignore_eos=True)
    samples = []
    for speculative in (None, NGRAM):
        llm = make_llm(smollm2_path, **{**smollm2_llm_kwargs, "seed": 11}, speculative_config=speculative)
        outs = llm.generate([COPY_PROMPT] * 600, params, use_tqdm=False)
        samples.append(np.array([o.outputs[0].token_ids[1:4] for o in outs]).reshape(-1))
        if speculative is not None:
            _assert_speculated(llm)
        llm.llm_engine.shutdown()
    tokens, counts = np.unique(np.concatenate(samples), return_counts=True)
    frequent = tokens[counts >= 10]
    table = np.array([[np.isin(s, frequent, invert=True).sum()] + [(s == t).sum() for t in frequent]
                      for s in samples], dtype=float)
    table = table[:, table.sum(axis=0) > 0]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    assert df >= 5, "too few distinct tokens for a meaningful test"
    assert chi2_sf(stat, df) > 1e-3, (stat, df)

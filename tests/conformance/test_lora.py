"""Multi-LoRA serving (``enable_lora``) matches transformers with PEFT, token for token, in float32.

The adapters are seeded random PEFT adapters (tests/reference_impl.build_peft_adapter) saved by
peft itself, with lora_B scaled up so that each one moves the greedy path away from the base
model's (checked: a test that would pass with the adapter ignored proves nothing). The reference
is transformers with the adapter applied by peft, each prompt run alone.

One engine on the tiny "llama" (3 layers) with three adapters of different shapes: rank 8 on
all seven projections; rank 4 with rsLoRA (scaling alpha / sqrt(r)); rank 16 on q_proj and
v_proj only. ``max_loras=2``, so a batch of all three must hold one back, and
``max_cpu_loras=2``, so adapters leave host memory and are read again. It checks:

- greedy tokens per adapter (and the base model) equal peft's, and logprobs are within ATOL
  of peft's raw log_softmax;
- one batch mixing the three adapters and the base model gives each row its own reference;
- the prefix cache keys blocks by adapter: the same prompt under another adapter (or none)
  hits nothing and gets its own output; the same adapter again hits;
- add_lora / list_loras / remove_lora (an adapter whose requests have finished goes at once);
  an adapter id reused after remove_lora serves the new adapter's weights, and none of the
  old one's cached blocks, also while requests of the removed adapter still run (they
  finish with the old weights);
- a broken adapter (no folder, a truncated safetensors file) raises ValueError before
  anything runs, and the engine serves normally afterwards.

A second engine on the tiny "qwen2" (q/k/v biases) runs the mixed batch. ``slow``: SmolLM2-135M
(its GGUF served as the engine serves it by default; the reference dequantizes it) with a
rank-16 adapter on all seven projections, mixed with base-model rows.

Tolerance: ATOL = 1e-3 nats, as in test_logprobs_match_hf (float32 sums in another order
differ by ~1e-5; a missing or misscaled delta moves logprobs by whole nats).

Runs where the platform serves LoRA (supports_lora); elsewhere it skips, saying so.
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import pytest
from hf_reference import REFERENCE_PROMPTS, TOP_K, HfSample, assert_no_near_ties
from piston import LoRARequest, SamplingParams
from piston.hal.registry import get_platform
from reference import reference

MAX_TOKENS = 12
ATOL = 1e-3
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
GREEDY_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
# name -> (lora_int_id, rank, alpha, seed, target_modules (None: all seven), use_rslora). Every
# scaling is 2 (rsLoRA: 4 / sqrt(4)); read as alpha / r, the rsLoRA adapter would be 1 and its
# greedy paths differ.
ADAPTERS = {
    "r8-all": (1, 8, 16, 11, None, False),
    "r4-rslora": (2, 4, 4, 12, None, True),
    "r16-qv": (3, 16, 32, 13, ["q_proj", "v_proj"], False),
}
# lora_B times 3: every greedy path moves off the base model's, while the hidden states stay
# near the base model's size (~100-150; x20 reaches 75000, and float32 logprobs drift by 5e-3).
SCALE_B = 3.0
NAMES = [None, *ADAPTERS]  # None: the base model
# 4, 6, 34 and 200 tokens. Every llama test draws on these prompts' references (16, and two
# more), so the prefix-cache and mixed-batch tests reset the prefix cache first.
PROMPTS = [REFERENCE_PROMPTS[i] for i in (0, 2, 7, 8)]
PREFIX_PROMPT = PROMPTS[3]  # 200 tokens: 12 full blocks of 16
# SmolLM2's weights are trained, not random: lora_B x0.5 already moves every path and keeps the
# text coherent (x1 puts a near-tie, 1e-4, on "def fibonacci(n):"; x2 makes noise).
SMOLLM2_SCALE_B = 0.5
# Their greedy paths, with the adapter and without, have no near-ties (top-2 gap > 5e-3; with
# the adapter, "Hi" has one of 1.7e-3 and the Chinese prompt one of 6.8e-3: left out).
SMOLLM2_PROMPTS = [REFERENCE_PROMPTS[i] for i in (0, 1, 2, 4, 5, 6, 7, 8)]


@pytest.fixture(autouse=True)
def _needs_lora():
    platform = get_platform(None)
    if not platform.supports_lora:
        pytest.skip(f"platform {platform.name} cannot serve LoRA adapters yet (supports_lora=False)")


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory):
    """Factory: ``peft_adapters(model)`` -> {name: folder} of ADAPTERS for that model (built
    once per session by peft)."""
    built: dict[str, dict[str, str]] = {}

    def get(model: str) -> dict[str, str]:
        if model not in built:
            folders = {}
            for name, (_, rank, alpha, seed, modules, rslora) in ADAPTERS.items():
                folder = str(tmp_path_factory.mktemp(f"lora-{name}"))
                folders[name] = reference().build_peft_adapter(model, folder, rank, alpha, seed, modules, rslora,
                                                               SCALE_B)
            built[model] = folders
        return built[model]

    return get


@functools.lru_cache(maxsize=None)
def _peft_one(model: str, adapter: str | None, prompt: tuple[int, ...], max_new_tokens: int) -> HfSample:
    ids, full = reference().peft_greedy(model, adapter, list(prompt), max_new_tokens)
    top = [{int(i): float(row[i]) for i in np.argsort(-row, kind="stable")[:TOP_K]} for row in full]
    return HfSample(list(ids), top, full)


def peft_greedy(model: str, adapter: str | None, prompts_ids, max_new_tokens: int = MAX_TOKENS) -> list[HfSample]:
    """transformers + peft greedy references, one prompt at a time (cached per session)."""
    return [_peft_one(model, adapter, tuple(int(t) for t in p), max_new_tokens) for p in prompts_ids]


def _lora(folders: dict[str, str], name: str | None) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, ADAPTERS[name][0], folders[name])


def _folder(folders: dict[str, str], name: str | None) -> str | None:
    return None if name is None else folders[name]


def _tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


def _assert_logprobs_close(completion, ref: HfSample, where: str) -> None:
    assert completion.logprobs is not None and len(completion.logprobs) == len(ref.token_ids), where
    for pos, (token_id, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref.full_logprobs[pos]
        assert entry[token_id].rank == 1, f"{where}, position {pos}: greedy token not ranked 1"
        for tid, lp in entry.items():
            assert abs(lp.logprob - float(row[tid])) <= ATOL, (
                f"{where}, position {pos}: token {tid} logprob {lp.logprob:.5f}, peft {float(row[tid]):.5f}")
        top = sorted((lp.logprob for lp in entry.values() if lp.rank <= TOP_K), reverse=True)
        np.testing.assert_allclose(top, np.sort(row)[::-1][:TOP_K], atol=ATOL, rtol=0, err_msg=where)


def _make_lora_llm(make_llm_module, path: str):
    return make_llm_module(path, enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2,
                           max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32")


# ----- the tiny llama: one engine for the module ----------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_models, peft_adapters):
    path = tiny_models("llama")
    return path, peft_adapters(path)


@pytest.fixture(scope="module")
def llama_llm(llama, make_llm_module):
    return _make_lora_llm(make_llm_module, llama[0])


@pytest.mark.parametrize("name", NAMES, ids=lambda n: n or "base")
def test_greedy_and_logprobs_per_adapter_match_peft(name, llama, llama_llm, smollm2_tokenizer):
    path, folders = llama
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in PROMPTS]
    refs = peft_greedy(path, _folder(folders, name), prompt_ids)
    assert_no_near_ties(refs)
    if name is not None:  # the adapter changes the output, else this test could not see it ignored
        base = peft_greedy(path, None, prompt_ids)
        assert all(r.token_ids != b.token_ids for r, b in zip(refs, base)), "the adapter should move every path"

    outputs = llama_llm.generate(PROMPTS, GREEDY_LOGPROBS, lora_request=_lora(folders, name), use_tqdm=False)
    assert len(outputs) == len(refs)
    for i, (out, ref) in enumerate(zip(outputs, refs)):
        assert out.prompt_token_ids == prompt_ids[i]
        completion = out.outputs[0]
        assert completion.token_ids == ref.token_ids, f"{name or 'base'}, prompt {i}: tokens differ from peft"
        assert completion.finish_reason == "length"
        _assert_logprobs_close(completion, ref, f"{name or 'base'}, prompt {i}")


def _rotated_rows(prompts) -> list[tuple[str, str | None]]:
    """(prompt, adapter name) rows: prompt i with every name, the names rotated by i. The queue
    opens with base, r8-all, r4-rslora, r16-qv: with max_loras=2 the third adapter waits while
    the rows behind it of the adapters already running, and of the base model, are admitted."""
    return [(p, name) for i, p in enumerate(prompts) for name in NAMES[i % 4:] + NAMES[:i % 4]]


def test_batch_mixing_three_adapters_and_base_matches_each_alone(llama, llama_llm, smollm2_tokenizer):
    path, folders = llama
    rows = _rotated_rows(PROMPTS)
    prompt_ids = [smollm2_tokenizer(p).input_ids for p, _ in rows]
    refs = [peft_greedy(path, _folder(folders, name), [ids])[0] for ids, (_, name) in zip(prompt_ids, rows)]
    assert_no_near_ties(refs)

    assert llama_llm.reset_prefix_cache()  # every prompt computed again, its prefill in the mixed batch
    outputs = llama_llm.generate([p for p, _ in rows], GREEDY, lora_request=[_lora(folders, n) for _, n in rows],
                                 use_tqdm=False)
    assert len(outputs) == len(rows)
    for i, (out, ref, (_, name)) in enumerate(zip(outputs, refs, rows)):
        assert out.error is None, f"row {i} ({name or 'base'}) failed: {out.error}"
        assert out.num_cached_tokens == 0
        assert out.outputs[0].token_ids == ref.token_ids, f"row {i} ({name or 'base'}): tokens differ from peft"


def test_prefix_cache_never_shares_blocks_across_adapters(llama, llama_llm, smollm2_tokenizer):
    path, folders = llama
    block_size = llama_llm.llm_engine.config.cache_config.block_size
    ids = smollm2_tokenizer(PREFIX_PROMPT).input_ids
    full_hit = (len(ids) - 1) // block_size * block_size  # the last prompt token is always computed
    assert full_hit >= 4 * block_size
    refs = {name: peft_greedy(path, _folder(folders, name), [ids])[0] for name in NAMES}

    def run(names):
        outputs = llama_llm.generate([PREFIX_PROMPT] * len(names), GREEDY,
                                     lora_request=[_lora(folders, n) for n in names], use_tqdm=False)
        for out, name in zip(outputs, names):
            assert out.outputs[0].token_ids == refs[name].token_ids, f"{name or 'base'}: tokens differ from peft"
        return [out.num_cached_tokens for out in outputs]

    assert llama_llm.reset_prefix_cache()
    # One at a time: each finds the blocks of those before it, of other adapters only.
    assert run(["r8-all"]) == [0]
    assert run(["r4-rslora"]) == [0], "r4-rslora reused blocks computed with r8-all"
    assert run([None]) == [0], "the base model reused blocks computed with an adapter"
    # The same adapter again hits all of its own blocks; r16-qv, new to this prompt, none.
    assert run(["r8-all", "r4-rslora", None, "r16-qv"]) == [full_hit, full_hit, full_hit, 0]


def test_add_list_remove_lora(llama, llama_llm, smollm2_tokenizer):
    path, folders = llama
    [ref] = peft_greedy(path, folders["r8-all"], [smollm2_tokenizer(PROMPTS[2]).input_ids])
    extra = LoRARequest("extra", 10, folders["r8-all"])  # r8-all's weights under another id

    assert llama_llm.add_lora(extra) is True
    assert 10 in llama_llm.list_loras()
    assert llama_llm.remove_lora(10) is True
    assert 10 not in llama_llm.list_loras()
    assert llama_llm.remove_lora(10) is False, "a second remove_lora finds nothing to remove"

    assert llama_llm.add_lora(extra) is True
    [out] = llama_llm.generate(PROMPTS[2], GREEDY, lora_request=extra, use_tqdm=False)
    assert out.outputs[0].token_ids == ref.token_ids
    # Its request has finished: nothing uses it, so it goes now, not at some later step.
    assert llama_llm.remove_lora(10) is True
    assert 10 not in llama_llm.list_loras(), "an adapter whose requests have all finished is still loaded"
    assert llama_llm.remove_lora(10) is False, "a second remove_lora finds nothing to remove"
    # Requests may name it again: it is read from disk on first use.
    [out] = llama_llm.generate(PROMPTS[2], GREEDY, lora_request=extra, use_tqdm=False)
    assert out.outputs[0].token_ids == ref.token_ids
    assert 10 in llama_llm.list_loras()
    assert llama_llm.remove_lora(10) is True


def test_adapter_id_reused_after_remove_serves_the_new_weights(llama, llama_llm, smollm2_tokenizer):
    """remove_lora frees the id (the front end then accepts it for another folder). The next
    adapter under it must run with its own weights and must not hit the prefix-cache blocks
    computed with the removed one."""
    path, folders = llama
    prompt_ids = smollm2_tokenizer(PROMPTS[2]).input_ids  # 34 tokens: two full blocks
    [old] = peft_greedy(path, folders["r4-rslora"], [prompt_ids])
    [new] = peft_greedy(path, folders["r16-qv"], [prompt_ids])

    [out] = llama_llm.generate(PROMPTS[2], GREEDY, lora_request=LoRARequest("v", 11, folders["r4-rslora"]),
                               use_tqdm=False)
    assert out.outputs[0].token_ids == old.token_ids
    assert llama_llm.remove_lora(11) is True
    [out] = llama_llm.generate(PROMPTS[2], GREEDY, lora_request=LoRARequest("v", 11, folders["r16-qv"]),
                               use_tqdm=False)
    got = out.outputs[0].token_ids
    assert got == new.token_ids, (
        f"id 11 re-registered with r16-qv's weights: {out.num_cached_tokens} prompt tokens from the prefix cache, "
        f"and {'the removed adapter' if got == old.token_ids else 'neither adapter'}'s tokens")
    llama_llm.remove_lora(11)


def test_adapter_id_reused_while_the_removed_adapters_requests_run(llama, llama_llm, smollm2_tokenizer):
    """remove_lora while a request still runs with the adapter: that request finishes with it,
    and a request that names the freed id with another folder meanwhile gets the new weights."""
    path, folders = llama
    engine = llama_llm.llm_engine
    old_ids, new_ids = (smollm2_tokenizer(p).input_ids for p in PROMPTS[:2])
    [old] = peft_greedy(path, folders["r8-all"], [old_ids], 128)  # long: still running when the new one comes
    [new] = peft_greedy(path, folders["r16-qv"], [new_ids])
    outputs: dict = {}

    def step() -> None:
        for out in engine.step():
            outputs[out.request_id] = out

    engine.add_request("reuse-old", old_ids, SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True),
                       lora_request=LoRARequest("w", 12, folders["r8-all"]))
    step()
    assert llama_llm.remove_lora(12) is True
    engine.add_request("reuse-new", new_ids, GREEDY, lora_request=LoRARequest("w", 12, folders["r16-qv"]))
    while "reuse-new" not in outputs:
        step()
    assert not outputs["reuse-old"].finished, "the old request finished too soon to test this"
    while engine.has_unfinished_requests():
        step()
    assert outputs["reuse-old"].outputs[0].token_ids == old.token_ids, "the running request lost its adapter"
    assert outputs["reuse-new"].outputs[0].token_ids == new.token_ids, "the new adapter under the reused id " \
        "did not get its own weights"
    llama_llm.remove_lora(12)


def test_broken_adapter_raises_before_anything_runs(llama, llama_llm, smollm2_tokenizer, tmp_path):
    path, folders = llama
    truncated = tmp_path / "truncated"
    shutil.copytree(folders["r8-all"], truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    good = _lora(folders, "r8-all")
    broken = [LoRARequest("missing", 20, str(tmp_path / "no-such-folder")),
              LoRARequest("truncated", 21, str(truncated))]

    for bad in broken:
        with pytest.raises(ValueError, match=bad.lora_name):
            llama_llm.generate(PROMPTS[:2], GREEDY, lora_request=bad, use_tqdm=False)
        with pytest.raises(ValueError, match=bad.lora_name):  # the good row before it must not run either
            llama_llm.generate(PROMPTS[:2], GREEDY, lora_request=[good, bad], use_tqdm=False)
        with pytest.raises(ValueError, match=bad.lora_name):
            llama_llm.add_lora(bad)
        assert bad.lora_int_id not in llama_llm.list_loras()
    with pytest.raises(ValueError, match="lora_int_id 1 already names"):  # one id, two folders
        llama_llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("r8-all", 1, str(truncated)), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llama_llm.generate(PROMPTS[:2], GREEDY, lora_request=[good], use_tqdm=False)

    assert not llama_llm.llm_engine.has_unfinished_requests()
    refs = peft_greedy(path, folders["r8-all"], [smollm2_tokenizer(p).input_ids for p in PROMPTS[:2]])
    outputs = llama_llm.generate(PROMPTS[:2], GREEDY, lora_request=good, use_tqdm=False)
    assert _tokens(outputs) == [r.token_ids for r in refs]


# ----- the tiny qwen2: q/k/v projections with biases --------------------------------------


def test_qwen2_mixed_batch_matches_peft(tiny_models, peft_adapters, make_llm_module, smollm2_tokenizer):
    path = tiny_models("qwen2")
    folders = peft_adapters(path)
    rows = _rotated_rows([PROMPTS[0], PROMPTS[2]])
    prompt_ids = [smollm2_tokenizer(p).input_ids for p, _ in rows]
    refs = [peft_greedy(path, _folder(folders, name), [ids])[0] for ids, (_, name) in zip(prompt_ids, rows)]
    assert_no_near_ties(refs)
    base = {tuple(ids): r.token_ids for ids, r, (_, name) in zip(prompt_ids, refs, rows) if name is None}
    assert all(r.token_ids != base[tuple(ids)] for ids, r, (_, n) in zip(prompt_ids, refs, rows) if n), (
        "every adapter should move every path")

    llm = _make_lora_llm(make_llm_module, path)
    outputs = llm.generate([p for p, _ in rows], GREEDY, lora_request=[_lora(folders, n) for _, n in rows],
                           use_tqdm=False)
    for i, (out, ref, (_, name)) in enumerate(zip(outputs, refs, rows)):
        assert out.outputs[0].token_ids == ref.token_ids, f"row {i} ({name or 'base'}): tokens differ from peft"


# ----- SmolLM2 -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_rank16_adapter_matches_peft(smollm2_path, smollm2_llm_kwargs, make_llm, smollm2_tokenizer,
                                             tmp_path):
    """SmolLM2-135M (30 layers; its Q4_1 GGUF served packed, as by default, against transformers
    on the dequantized file, as test_greedy_matches_hf does) with a rank-16 adapter on all seven
    projections, its rows mixed with base-model rows in one batch."""
    folder = reference().build_peft_adapter(smollm2_path, str(tmp_path / "smollm2-r16"), 16, 32, 7, None, False,
                                            SMOLLM2_SCALE_B)
    prompts = SMOLLM2_PROMPTS
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in prompts]
    refs = peft_greedy(smollm2_path, folder, prompt_ids, 24)
    base = peft_greedy(smollm2_path, None, prompt_ids, 24)
    assert_no_near_ties(refs + base, margin=5e-3)
    assert all(r.token_ids != b.token_ids for r, b in zip(refs, base)), "the adapter should move every path"

    lora = LoRARequest("smollm2-r16", 1, folder)
    llm = make_llm(smollm2_path, enable_lora=True, max_loras=1, max_lora_rank=16, **smollm2_llm_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    rows = [(p, lora) for p in prompts] + [(p, None) for p in prompts]
    rows = rows[::2] + rows[1::2]  # adapter and base rows interleaved
    expected = [r.token_ids for r in refs + base]
    expected = expected[::2] + expected[1::2]
    outputs = llm.generate([p for p, _ in rows], params, lora_request=[lr for _, lr in rows], use_tqdm=False)
    for i, (out, want, (_, lr)) in enumerate(zip(outputs, expected, rows)):
        assert out.outputs[0].token_ids == want, f"row {i} ({'adapter' if lr else 'base'}): tokens differ from peft"

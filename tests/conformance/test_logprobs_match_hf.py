"""Log-probabilities match Hugging Face transformers' raw log_softmax, in float32.

Tolerance: ATOL = 1e-3 nats on every returned log-probability, for SmolLM2 (30 layers)
and the tiny models alike. Float32 kernels that sum in another order differ by ~1e-5 on
these models; 1e-3 leaves room for that and still catches a wrong temperature, penalty
or softmax over processed logits (the engine must return raw model logprobs).

Top-k membership is compared through values, not ids: two tokens within ATOL of each
other may trade places in the top k, so the sorted top-k values must agree, and every
returned id must carry HF's value for that id.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import REFERENCE_PROMPTS, TOP_K, hf_greedy, hf_prompt_logprobs
from piston import SamplingParams

ATOL = 1e-3
MAX_TOKENS = 24  # the same as test_greedy_matches_hf, so the HF references are shared


def _hf_rank_bounds(row: np.ndarray, token_id: int) -> tuple[int, int]:
    """The ranks `token_id` may have in `row` once values within ATOL count as ties."""
    value = row[token_id]
    return 1 + int((row > value + ATOL).sum()), 1 + int((row > value - ATOL).sum())


def _assert_position_close(entry: dict, row: np.ndarray, token_id: int, where: str) -> None:
    """One position's {token_id: Logprob} against HF's full log-probability row."""
    assert token_id in entry, f"{where}: the chosen token {token_id} is missing"
    for tid, lp in entry.items():
        assert abs(lp.logprob - float(row[tid])) <= ATOL, (
            f"{where}: token {tid} logprob {lp.logprob:.5f}, HF {float(row[tid]):.5f}"
        )
    top = sorted((lp.logprob for tid, lp in entry.items() if lp.rank <= TOP_K), reverse=True)
    assert len(top) == TOP_K, f"{where}: expected {TOP_K} top entries, got {len(top)}"
    np.testing.assert_allclose(top, np.sort(row)[::-1][:TOP_K], atol=ATOL, rtol=0)
    lo, hi = _hf_rank_bounds(row, token_id)
    assert lo <= entry[token_id].rank <= hi, f"{where}: rank {entry[token_id].rank} not in [{lo}, {hi}]"


def _check_generated(path, tokenizer, llm, prompts) -> None:
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_K)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    for i, (out, ref) in enumerate(zip(outputs, reference)):
        completion = out.outputs[0]
        assert completion.token_ids == ref.token_ids, f"prompt {i}: greedy tokens differ from HF"
        assert completion.logprobs is not None and len(completion.logprobs) == len(ref.token_ids)
        chosen = []
        for pos, (token_id, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = ref.full_logprobs[pos]
            _assert_position_close(entry, row, token_id, f"prompt {i}, position {pos}")
            assert entry[token_id].rank == 1  # greedy picks the most likely token
            assert entry[token_id].decoded_token == tokenizer.decode([token_id])
            chosen.append(float(row[token_id]))
        assert completion.cumulative_logprob == pytest.approx(sum(chosen), abs=ATOL * len(chosen))


def _check_prompt_logprobs(path, tokenizer, llm, prompts) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_K)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    for i, out in enumerate(outputs):
        ids = out.prompt_token_ids
        assert ids == tokenizer(prompts[i]).input_ids
        rows = hf_prompt_logprobs(path, ids)
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
        assert out.prompt_logprobs[0] is None  # nothing predicts the first token
        for pos in range(1, len(ids)):
            _assert_position_close(
                out.prompt_logprobs[pos], rows[pos - 1], ids[pos], f"prompt {i}, token {pos}"
            )


# A short, a medium and the 200-token prompt, whose prompt logprobs span many blocks.
SMOLLM2_PROMPTS = [REFERENCE_PROMPTS[i] for i in (0, 6, 7, 8)]


def test_smollm2_generated_logprobs_match_hf(smollm2_llm, smollm2_path, smollm2_tokenizer):
    _check_generated(smollm2_path, smollm2_tokenizer, smollm2_llm, SMOLLM2_PROMPTS)


def test_smollm2_prompt_logprobs_match_hf_teacher_forcing(
    smollm2_llm, smollm2_path, smollm2_tokenizer
):
    # The session engine has already cached these prompts' blocks (prefix caching is on);
    # prompt logprobs must still cover every prompt position.
    _check_prompt_logprobs(smollm2_path, smollm2_tokenizer, smollm2_llm, SMOLLM2_PROMPTS)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_tiny_model_logprobs_match_hf(name, tiny_models, make_llm, smollm2_tokenizer):
    path = tiny_models(name)
    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32")
    _check_generated(path, smollm2_tokenizer, llm, REFERENCE_PROMPTS)
    _check_prompt_logprobs(path, smollm2_tokenizer, llm, REFERENCE_PROMPTS[4:9])

"""Hugging Face transformers as the correctness reference (helpers, not tests).

The transformers calls run through ``reference.reference()``: in this process when torch
is installed, else in an interpreter that has it (see tests/reference.py).

`hf_greedy` runs each prompt alone (batch 1, no padding, float32, greedy) and returns
the new tokens plus the raw model log-probabilities (log_softmax of the unprocessed
logits) at every generated position. `hf_prompt_logprobs` gives the teacher-forced
log-probabilities of a prompt. Loaded models and greedy results are cached per path,
so each reference is computed once per test session.

Comparison rules:
- Exact token equality is the default (test_greedy_matches_hf, test_invariance): the
  tiny models are initialised with a large weight std so greedy margins are wide, and
  the SmolLM2 prompts are checked for near-ties on the reference path
  (`assert_no_near_ties`) so a failure points at the engine, not at float32 noise.
- `check_logprobs_close` is vLLM's relaxed rule (vllm/tests/models/utils.py). A change
  in batch shape or kernel reorders float32 sums, and that can swap two tokens whose
  logits are tied to ~1e-6. The rule accepts the first divergence if each side's token
  is in the other side's top-k, then stops comparing that sequence. Tests use it only
  where they say why, on paths whose near-ties they cannot rule out beforehand.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np
from reference import reference

TOP_K = 5

_ALICE = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
    "nothing to do: once or twice she had peeped into the book her sister was reading, but it had "
    "no pictures or conversations in it, 'and what is the use of a book,' thought Alice 'without "
    "pictures or conversations?' So she was considering in her own mind (as well as she could, for "
    "the hot day made her feel very sleepy and stupid), whether the pleasure of making a "
    "daisy-chain would be worth the trouble of getting up and picking the daisies, when suddenly a "
    "White Rabbit with pink eyes ran close by her. There was nothing so very remarkable in that; nor "
    "did Alice think it so very much out of the way to hear the Rabbit say to itself, 'Oh dear! Oh "
    "dear! I shall be late!' When the Rabbit actually took a watch out of its waistcoat-pocket, and "
    "looked at it, and then hurried on, Alice"
)

# Prompts whose SmolLM2 greedy paths (24 tokens) have no near-ties (top-2 gap > 7e-3),
# from 1 to 200 tokens; index 0 is the known "Once upon a time" story.
REFERENCE_PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Hi",
    "List three primary colors:",
    "Water boils at a temperature of",
    "Translate to French: I like apples. ->",
    "The mitochondria is the powerhouse of the cell. In this essay, I will explain how cellular "
    "respiration works, starting with glycolysis in the cytoplasm and ending with oxidative "
    "phosphorylation",
    _ALICE,  # 200 tokens
    "我最喜欢的食物是",
]
# A chat prompt SmolLM2 answers in 8 tokens, the last one EOS ("2 + 2 = 4<|im_end|>").
SHORT_ANSWER_QUESTION = "What is 2+2? Answer with a number only."
# Longer than the tiny models' original rope context (128), for llama3 rope scaling.
LONG_PROMPT = " ".join([_ALICE] * 3)


class HfSample(NamedTuple):
    """One greedy completion: new token ids, top-k logprobs per position, and the full
    [num_new_tokens, vocab] raw log-probability matrix (numpy float32)."""

    token_ids: list[int]
    logprobs: list[dict[int, float]]
    full_logprobs: np.ndarray


def _top_k(row: np.ndarray, k: int) -> dict[int, float]:
    ids = np.argsort(-row, kind="stable")[:k]
    return {int(i): float(row[i]) for i in ids}


@functools.lru_cache(maxsize=64)
def _greedy_one(path: str, prompt: tuple[int, ...], max_new_tokens: int) -> HfSample:
    new_ids, full = reference().greedy(path, list(prompt), max_new_tokens)
    return HfSample(list(new_ids), [_top_k(row, TOP_K) for row in full], full)


def hf_greedy(
    model_dir_or_gguf: str, prompt_token_ids_list: Sequence[Sequence[int]], max_new_tokens: int
) -> list[HfSample]:
    """Greedy completions, one prompt at a time; stops at EOS as HF generate does.

    Returns, per prompt, only the new tokens (EOS included when it was generated) and
    their raw log-probabilities.
    """
    path = str(model_dir_or_gguf)
    return [_greedy_one(path, tuple(int(t) for t in p), max_new_tokens) for p in prompt_token_ids_list]


def hf_prompt_logprobs(model_dir_or_gguf: str, prompt_token_ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced raw log-probabilities: row i is the distribution of prompt token i+1."""
    return reference().prompt_logprobs(str(model_dir_or_gguf), [int(t) for t in prompt_token_ids])


@functools.lru_cache(maxsize=4)
def hf_config(model_dir_or_gguf: str) -> dict:
    """The model's config as transformers reads it, as a dict."""
    return reference().config(str(model_dir_or_gguf))


def min_greedy_margin(sample: HfSample) -> float:
    """Smallest top-1 minus top-2 log-probability gap along a greedy path."""
    if not len(sample.token_ids):
        return float("inf")
    top2 = np.sort(sample.full_logprobs, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


def assert_no_near_ties(samples: Sequence[HfSample], margin: float = 1e-3) -> None:
    """Guard for exact-equality tests: the reference itself has no float32 coin flips."""
    for i, sample in enumerate(samples):
        gap = min_greedy_margin(sample)
        assert gap > margin, (
            f"reference prompt {i} has a near-tie (top-2 gap {gap:.2e} <= {margin:.0e}); "
            "choose another prompt or compare it with check_logprobs_close"
        )


def as_samples(request_outputs) -> list[tuple[list[int], list[dict[int, float]] | None]]:
    """(token_ids, {token_id: logprob}) per request from engine RequestOutputs."""
    samples = []
    for out in request_outputs:
        completion = out.outputs[0]
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [{t: lp.logprob for t, lp in pos.items()} for pos in completion.logprobs]
        samples.append((list(completion.token_ids), logprobs))
    return samples


def check_logprobs_close(outputs_0, outputs_1, name_0: str, name_1: str) -> None:
    """vLLM's rule: equal tokens, or a first divergence where each side's token is in the
    other side's top-k logprobs, after which that sequence is no longer compared.

    Each output is a (token_ids, logprobs) pair, e.g. an HfSample or from `as_samples`.
    """
    assert len(outputs_0) == len(outputs_1), f"{name_0} and {name_1} differ in count"
    for prompt_idx, (out_0, out_1) in enumerate(zip(outputs_0, outputs_1)):
        ids_0, logprobs_0 = out_0[0], out_0[1]
        ids_1, logprobs_1 = out_1[0], out_1[1]
        for pos, (tok_0, tok_1) in enumerate(zip(ids_0, ids_1)):
            if tok_0 == tok_1:
                continue
            where = f"prompt {prompt_idx}, position {pos}: {name_0}={tok_0}, {name_1}={tok_1}"
            assert logprobs_0 is not None and logprobs_1 is not None, f"{where}; no logprobs"
            assert tok_0 in logprobs_1[pos], f"{where}; {tok_0} not in {name_1} top-k {logprobs_1[pos]}"
            assert tok_1 in logprobs_0[pos], f"{where}; {tok_1} not in {name_0} top-k {logprobs_0[pos]}"
            break
        else:
            assert len(ids_0) == len(ids_1), (
                f"prompt {prompt_idx}: {name_0} has {len(ids_0)} tokens, {name_1} has {len(ids_1)}"
            )

"""Quantized weights served as they are, against transformers on the same weights dequantized.

- GGUF files of the tiny models, written with the ``gguf`` package (tests/gguf_models.py):
  every packed format Piston serves, mixed within fused layers (q, k, v in different
  formats), against transformers loading the same file (it dequantizes with gguf.quants).
- ``quantization="int8"`` on a float checkpoint, against transformers on a copy of it whose
  linear weights are the int8 values times their scales.

The CPU serves the packed weights with float32 activations and sums, so the reference
rules of test_logprobs_match_hf apply unchanged: the same greedy tokens, and every
returned logprob within ATOL = 1e-3 of transformers'. The TPU plugin dequantizes a GGUF
at load and runs int8 weights through JAX (weight times per-channel scale after the
matmul); the same tolerance holds there.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from gguf_models import write_gguf
from hf_reference import REFERENCE_PROMPTS
from marks import SLOW_ON_TPU
from test_logprobs_match_hf import _check_generated, _check_prompt_logprobs

# Every format served packed, spread over the tensors so fused layers mix them.
BLOCK32_FORMATS = {"embed_tokens": "Q8_0", "lm_head": "Q5_1", "q_proj": "Q4_0", "k_proj": "Q4_1",
                   "v_proj": "Q5_0", "o_proj": "Q5_1", "gate_proj": "Q8_0", "up_proj": "F16", "down_proj": "BF16"}
K_FORMATS = {"embed_tokens": "Q4_K", "lm_head": "Q6_K", "q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K",
             "o_proj": "Q5_K", "gate_proj": "Q4_K", "up_proj": "Q5_K", "down_proj": "Q6_K"}
CASES = {"block32": ("llama", BLOCK32_FORMATS), "k-quants": ("llama-256", K_FORMATS)}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def quantized_gguf(tiny_models, tmp_path_factory):
    built: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in built:
            name, formats = CASES[case]
            path = str(tmp_path_factory.mktemp(f"gguf-{case}") / f"tiny-{case}.gguf")
            built[case] = write_gguf(tiny_models(name), path,
                                     lambda n: next(f for key, f in formats.items() if key in n))
        return built[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_served_packed_matches_hf(case, quantized_gguf, tiny_models, make_llm, smollm2_tokenizer):
    path = quantized_gguf(case)
    # The tiny folder's tokenizer files: the same tokenizer as the GGUF's, without converting it.
    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32",
                   tokenizer=tiny_models(CASES[case][0]))
    _check_generated(path, smollm2_tokenizer, llm, REFERENCE_PROMPTS[:4])
    _check_prompt_logprobs(path, smollm2_tokenizer, llm, REFERENCE_PROMPTS[6:8])


def _int8_reference_folder(folder: str, out: str) -> str:
    """A copy of ``folder`` whose linear weights are what int8 serving computes with."""
    from piston.checkpoint.packed import quantize_int8
    from safetensors.numpy import load_file, save_file

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(folder, name), out)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    for name, w in tensors.items():  # an MoE model's routed experts and router stay float
        if name.endswith(".weight") and name.split(".")[-2] in LINEAR and ".experts." not in name:
            tensors[name] = quantize_int8(w).dequantize()
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] in ("llama", "qwen2", "qwen2_moe")
    return out


# qwen2-moe: int8 attention, dense MLPs and shared expert; the router, its gate and the
# routed experts float (on every platform).
@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2", marks=SLOW_ON_TPU),  # 18 s and 23 s on the
                                  pytest.param("qwen2-moe", marks=SLOW_ON_TPU)])  # TPU plugin
def test_int8_quantized_at_load_matches_hf(name, tiny_models, make_llm, smollm2_tokenizer, tmp_path):
    folder = tiny_models(name)
    reference = _int8_reference_folder(folder, str(tmp_path / f"{name}-int8-reference"))
    llm = make_llm(folder, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32",
                   quantization="int8")
    _check_generated(reference, smollm2_tokenizer, llm, REFERENCE_PROMPTS[:4])
    _check_prompt_logprobs(reference, smollm2_tokenizer, llm, REFERENCE_PROMPTS[6:8])

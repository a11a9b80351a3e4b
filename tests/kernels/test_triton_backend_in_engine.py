"""The Triton backend inside the real engine loop (scheduler, runner, prefix cache), on the
CPU through Triton's interpreter: it must generate the same greedy tokens as the CPU
platform's SDPA attention, with cascade attention engaged by a shared system prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the CPU engine with the interpreter")

SYSTEM_PROMPT_LEN = 272  # 17 blocks of 16: past the 256-token cascade threshold
NUM_REQUESTS = 9
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory) -> str:
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)  # wide greedy margins (see tests/conftest.py)
    folder = tmp_path_factory.mktemp("tiny-llama-no-tokenizer")
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def _generate(folder: str, monkeypatch, triton_backend: bool) -> tuple[list[list[int]], int]:
    import piston_cpu.worker
    from piston.engine.arg_utils import EngineArgs
    from piston.engine.engine_core import EngineCore
    from piston.step.engine_messages import EngineCoreRequest
    from piston.step.sampling_params import SamplingParams
    from piston_cuda.attention.triton_attention import TritonAttention

    cascade_steps = []
    if triton_backend:
        class CountingTriton(TritonAttention):
            def build_metadata(self, common):
                md = super().build_metadata(common)
                cascade_steps.append(md.cascade is not None)
                return md

        monkeypatch.setattr(piston_cpu.worker, "CpuAttention", lambda kernels=None: CountingTriton(4, 2, 16))
    config = EngineArgs(model=folder, dtype="float32", kv_cache_memory="8MiB", max_model_len=512, seed=0,
                        max_num_batched_tokens=1024, platform="cpu").create_engine_config()
    core = EngineCore(config)
    rng = np.random.default_rng(0)
    system = rng.integers(3, 512, SYSTEM_PROMPT_LEN).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i in range(NUM_REQUESTS):
        own = rng.integers(3, 512, 3 + 5 * i).tolist()
        core.add_request(EngineCoreRequest(f"r{i}", system + own, params))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(NUM_REQUESTS)}
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            tokens[out.request_id] += out.new_token_ids
    core.shutdown()
    return [tokens[f"r{i}"] for i in range(NUM_REQUESTS)], sum(cascade_steps)


def test_triton_backend_generates_the_cpu_backends_tokens_with_cascade(tiny_llama_folder, monkeypatch):
    expected, _ = _generate(tiny_llama_folder, monkeypatch, triton_backend=False)
    actual, cascade_steps = _generate(tiny_llama_folder, monkeypatch, triton_backend=True)
    assert cascade_steps >= MAX_TOKENS - 1  # every decode step of the shared-prompt batch
    assert actual == expected
    assert all(len(t) == MAX_TOKENS for t in actual)

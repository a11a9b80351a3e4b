"""The CPU decoder stack (piston_cpu.decoder_stack): all layers of a Llama-family model in
one C++ call. It runs the layers' own kernels in the same order, so the engine's tokens
and logprobs must equal those of the layer-by-layer path exactly, on every kind of step
(chunked prompts with decodes, decodes alone, a prefix-cache hit), with float32 and with
packed weights."""

from __future__ import annotations

import pytest
import torch
from gguf_models import write_gguf
from piston_cpu import kernels

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="Piston's CPU kernels are unavailable here")

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hi",
           "List three primary colors, then explain why the sky is blue in two sentences, and why it is red at "
           "sunset:"]
# Asked after PROMPTS: its first blocks are the last prompt's, cached.
REPEAT = PROMPTS[-1] + " Answer briefly."


def _generate(make_llm, path, **extra):
    from piston import SamplingParams

    llm = make_llm(path, max_model_len=512, kv_cache_memory="64MiB", seed=0, dtype="float32",
                   max_num_batched_tokens=16, **extra)
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    # Without prompt logprobs, which need every prompt position computed (no cache hit).
    outputs += llm.generate([REPEAT], SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, ignore_eos=True),
                            use_tqdm=False)
    assert outputs[-1].num_cached_tokens >= 16  # a prefix-cache hit
    return llm.collective_rpc("kernel_info")[0], outputs


@pytest.mark.parametrize("weights", ["float32", "packed", "qwen3"])
def test_stack_equals_layer_by_layer(weights, tiny_models, make_llm, monkeypatch, tmp_path):
    """qwen3: per-head q/k norms."""
    path = tiny_models("qwen3" if weights == "qwen3" else "llama")
    extra = {}
    if weights == "packed":  # mixed formats, q/k/v and gate/up fused from different ones
        formats = {"q_proj": "Q4_0", "k_proj": "Q4_1", "v_proj": "Q8_0", "o_proj": "Q5_1", "gate_proj": "Q5_0",
                   "up_proj": "Q8_0", "down_proj": "Q4_1"}
        extra = {"tokenizer": path}
        path = write_gguf(path, str(tmp_path / "tiny.gguf"),
                          lambda n: next((f for key, f in formats.items() if key in n), "F32"))
    info, stacked = _generate(make_llm, path, **extra)
    assert info["decoder_stack"] is True and info["decoder_stack_steps"] >= 10  # it ran
    monkeypatch.setenv("PISTON_CPU_DECODER_STACK", "0")
    info, layered = _generate(make_llm, path, **extra)
    assert info["decoder_stack"] is False and info["decoder_stack_steps"] == 0 and info["layers"] > 0
    for a, b in zip(stacked, layered):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.prompt
        assert a.outputs[0].logprobs == b.outputs[0].logprobs, a.prompt
        assert a.prompt_logprobs == b.prompt_logprobs, a.prompt


def test_stack_declines_layers_it_cannot_run(ops_and_model):
    """A layer the stack does not implement (here: a q/k norm without its kernel) keeps the
    model layer by layer."""
    from piston_cpu import decoder_stack, layer_kernels

    ops, model = ops_and_model
    layer_kernels.install(model, ops)
    assert decoder_stack.install(ops, model) is model.model.layers_kernel is not None
    model.model.layers_kernel = None
    from piston.models.layers.layernorm import RMSNorm

    attn = model.model.layers[1].self_attn
    attn.q_norm, attn.k_norm = RMSNorm(attn.head_dim), RMSNorm(attn.head_dim)
    attn.k_norm.kernel = attn.q_norm.kernel = layer_kernels.make_rms_norm(ops)
    assert decoder_stack.install(ops, model) is not None  # Qwen3's norms: taken
    attn.k_norm.kernel = None
    model.model.layers_kernel = None
    assert decoder_stack.install(ops, model) is None
    assert model.model.layers_kernel is None


def test_stack_outside_a_forward_context_runs_layer_by_layer(ops_and_model):
    """Without attention metadata (unit tests of a model, a compiler's trace) the stack
    declines, and the model's output is the layers' own."""
    from piston_cpu import decoder_stack, layer_kernels

    ops, model = ops_and_model
    ids, positions = torch.randint(0, 300, (5,)), torch.arange(5)
    with torch.inference_mode():
        layer_kernels.install(model, ops)
        ref = model(ids, positions)
        assert decoder_stack.install(ops, model) is not None
        assert model.model.layers_kernel(positions, model.model.embed_tokens(ids)) is None
        assert torch.equal(model(ids, positions), ref)


def test_stack_checks_its_inputs(ops):
    stack = ops.DecoderStack()
    w = torch.randn(8, 8)
    plain = (w, [], [], None, 4, None, 0)  # weight, packed segments, codes, bias, kernel rows, packed copy, its rows
    with pytest.raises(RuntimeError, match="float32 or packed"):
        stack.add_layer(0, torch.ones(8), 1e-5, torch.ones(8), 1e-5, (w, [torch.zeros(4, dtype=torch.uint8)], [8],
                        None, 4, None, 0), *[plain] * 3, torch.zeros(16, 8), 8, 1, 1, 8, 1.0, 0)
    with pytest.raises(RuntimeError, match="packed copy needs its float32 weight"):
        stack.add_layer(0, torch.ones(8), 1e-5, torch.ones(8), 1e-5, (None, [torch.zeros(4, dtype=torch.uint8)], [8],
                        None, 0, torch.zeros(1, 8, 32), 64), *[plain] * 3, torch.zeros(16, 8), 8, 1, 1, 8, 1.0, 0)
    with pytest.raises(RuntimeError, match="head counts"):
        stack.add_layer(0, torch.ones(8), 1e-5, torch.ones(8), 1e-5, *[plain] * 4,
                        torch.zeros(16, 8), 8, 3, 2, 8, 1.0, 0)
    stack.add_layer(3, torch.ones(8), 1e-5, torch.ones(8), 1e-5, *[plain] * 4,
                    torch.zeros(16, 8), 8, 1, 1, 8, 1.0, 0)
    assert len(stack) == 1
    one = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="no KV cache for layer 3"):
        stack.forward(torch.randn(1, 8), torch.zeros(1, dtype=torch.int64), [torch.zeros(2, 1, 16, 1, 8)],
                      torch.zeros(1, dtype=torch.int64), one.view(1, 1), one, one + 1)


@pytest.fixture
def ops():
    return kernels.load()


@pytest.fixture
def ops_and_model(ops, random_llama):
    return ops, random_llama

"""The CPU packed GEMM (csrc/packed_gemm.cpp) and the packed copies of float32 weights
(piston_cpu.packed_weights): the kernel against a float64 product, the copies made, used,
freed on sleep and made again after the weights change, and the engine's output with them
against the engine's without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from piston_cpu import kernels

_ops = kernels.load()
pytestmark = pytest.mark.skipif(_ops is None, reason="Piston's CPU kernels are unavailable here")


@pytest.fixture(scope="module")
def ops():
    return _ops


def test_packing_puts_a_blocks_output_columns_side_by_side(ops):
    width = ops.packed_gemm_width()  # 32 in an AVX-512 build, 16 in an AVX2 one
    assert width in (16, 32)
    w = torch.randn(2 * width + 6, 9)
    packed = ops.pack_linear_weight(w)
    assert packed.shape == (3, 9, width)
    for n in (0, width - 1, width, 2 * width + 5):
        assert torch.equal(packed[n // width, :, n % width], w[n])
    assert not packed[2, :, 6:].any()  # the last block's missing columns are zeros


@pytest.mark.parametrize("rows", [1, 2, 5, 12, 13, 64, 100, 300])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (7, 13), (33, 1536), (64, 1)])
def test_packed_linear_matches_a_float64_product(ops, rows, out_features, in_features):
    """Rows in tiles of up to 12 (13 and 100: uneven), past 256 in chunks; N not a multiple
    of 32; with and without a bias; x as rows of a wider tensor; into a given buffer."""
    torch.manual_seed(rows * out_features)
    x, w, b = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    packed = ops.pack_linear_weight(w)
    tol = dict(atol=1e-5 * in_features ** 0.5 * 4, rtol=1e-5)
    exact = F.linear(x.double(), w.double(), b.double()).float()
    torch.testing.assert_close(ops.packed_linear(x, packed, out_features, b), exact, **tol)
    torch.testing.assert_close(ops.packed_linear(x, packed, out_features), (exact.double() - b.double()).float(),
                               **tol)
    wide = torch.randn(rows, in_features + 5)
    torch.testing.assert_close(ops.packed_linear(wide[:, 2:in_features + 2], packed, out_features),
                               F.linear(wide[:, 2:in_features + 2].double(), w.double()).float(), **tol)
    out = torch.full((rows, out_features), float("nan"))
    assert ops.packed_linear(x, packed, out_features, b, out) is out
    torch.testing.assert_close(out, exact, **tol)


def test_packed_linear_checks_its_inputs(ops):
    width = ops.packed_gemm_width()
    packed = ops.pack_linear_weight(torch.randn(40, 8))
    blocks = -(-40 // width)
    with pytest.raises(RuntimeError, match=rf"has shape \[{blocks + 1}, 8, {width}\], not \[{blocks}, 8, {width}\]"):
        ops.packed_linear(torch.randn(3, 8), packed, 40 + width)
    with pytest.raises(RuntimeError, match="has shape"):
        ops.packed_linear(torch.randn(3, 9), packed, 40)
    with pytest.raises(RuntimeError, match="bias must be float32 with 40"):
        ops.packed_linear(torch.randn(3, 8), packed, 40, torch.randn(39))
    with pytest.raises(RuntimeError, match="out must be"):
        ops.packed_linear(torch.randn(3, 8), packed, 40, None, torch.empty(3, 41))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.pack_linear_weight(torch.randn(8, 40).t())


def test_model_layers_use_their_packed_copies(ops, random_llama, monkeypatch):
    """install gives every linear and the LM head a slot (not the embedding: untied here);
    pack fills them; a layer whose weight was replaced falls back to the plain kernels;
    release frees them; a refused auto budget packs nothing."""
    from piston_cpu import layer_kernels, packed_weights

    model = random_llama
    ids, positions = torch.randint(0, 300, (40,)), torch.arange(40)
    with torch.inference_mode():
        ref_logits = model.compute_logits(model(ids, positions))
        calls = []

        class Counting:  # the kernels, counting the packed GEMM's calls
            def __getattr__(self, name):
                return getattr(ops, name)

            def packed_linear(self, *args):
                calls.append(args[2])
                return ops.packed_linear(*args)

        counting = packed_weights.PackedWeights(Counting())
        layer_kernels.install(model, Counting(), counting)
        assert len(counting.slots) == 2 * 4 + 1 and counting.packed_count() == 0  # not the untied embedding
        counting.pack()
        assert counting.packed_count() == len(counting.slots)
        logits = model.compute_logits(model(ids, positions))
        assert len(calls) == 2 * 4 + 1
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)

        layer = model.model.layers[0].mlp.down_proj
        slot = layer.kernel.packed_slot
        assert slot.current(layer.weight) is not None
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone() * 2, requires_grad=False)
        assert slot.current(layer.weight) is None  # a replaced weight: the plain kernels, until packed again
        counting.pack()
        assert slot.current(layer.weight) is not None

        held = [s.packed for _, s in counting.slots]
        counting.release()
        assert counting.packed_count() == 0 and all(t.numel() == 0 for t in held)  # emptied in place

        monkeypatch.setattr(packed_weights, "available_memory", lambda: counting.nbytes())
        counting.pack()  # auto: the copies would take all the memory there is
        assert counting.packed_count() == 0
        monkeypatch.setenv("PISTON_CPU_PACKED_WEIGHTS", "1")
        counting.pack()
        assert counting.packed_count() == len(counting.slots)
        monkeypatch.setenv("PISTON_CPU_PACKED_WEIGHTS", "sometimes")
        with pytest.raises(ValueError, match="PISTON_CPU_PACKED_WEIGHTS='sometimes'"):
            counting.pack()


def test_engine_with_packed_weights_matches_it_without(tiny_models, make_llm, monkeypatch):
    """Greedy tokens and logprobs with the packed GEMM equal those with the row-streaming
    kernel and torch's GEMM (PISTON_CPU_PACKED_WEIGHTS=0), on mixed prefill and decode
    steps; after a sleep and a wake-up the copies are made again and the output is the same."""
    from piston import SamplingParams

    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hi",
               "List three primary colors, then explain why the sky is blue in two sentences:"]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    kwargs = dict(max_model_len=512, kv_cache_memory="64MiB", seed=0, dtype="float32",
                  max_num_batched_tokens=32)
    path = tiny_models("llama")
    monkeypatch.setenv("PISTON_CPU_PACKED_WEIGHTS", "1")
    llm = make_llm(path, **kwargs)
    info = llm.collective_rpc("kernel_info")[0]
    assert info["packed_weights"] > 0 and info["decoder_stack"] is True
    fast = llm.generate(prompts, params, use_tqdm=False)
    llm.sleep(level=1)
    assert llm.collective_rpc("kernel_info")[0]["packed_weights"] == 0
    llm.wake_up()
    assert llm.collective_rpc("kernel_info")[0]["packed_weights"] == info["packed_weights"]
    again = llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("PISTON_CPU_PACKED_WEIGHTS", "0")
    llm = make_llm(path, **kwargs)
    assert llm.collective_rpc("kernel_info")[0]["packed_weights"] == 0
    slow = llm.generate(prompts, params, use_tqdm=False)
    for a, b, c in zip(fast, again, slow):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids, a.prompt
        assert a.outputs[0].logprobs == b.outputs[0].logprobs, a.prompt
        for step_a, step_c, token in zip(a.outputs[0].logprobs, c.outputs[0].logprobs, a.outputs[0].token_ids):
            assert step_a[token].logprob == pytest.approx(step_c[token].logprob, abs=1e-4)

"""Piston's C++ CPU kernels against torch on random data, and in a model against torch's path."""

import pytest
import torch
import torch.nn.functional as F
from piston_cpu import kernels

pytestmark = pytest.mark.skipif(kernels.unavailable_reason() is not None,
                                reason=f"CPU kernels: {kernels.unavailable_reason()}")


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None, "the CPU kernels should build on this machine"
    return module


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 64, 300])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (7, 13), (1, 8), (33, 1536)])
def test_linear_matches_torch(ops, rows, out_features, in_features):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), atol=2e-4, rtol=1e-5)
    # Rows of a wider tensor (a strided view), as the model passes q, k, v slices.
    wide = torch.randn(rows, in_features + 5)
    torch.testing.assert_close(ops.linear(wide[:, :in_features], w), F.linear(wide[:, :in_features], w),
                               atol=2e-4, rtol=1e-5)


def test_linear_rejects_mismatched_shapes(ops):
    with pytest.raises(RuntimeError, match="do not match"):
        ops.linear(torch.randn(2, 5), torch.randn(3, 4))


@pytest.mark.parametrize("wide_gemm", [False, True])
def test_linear_dispatch_follows_torchs_gemm_width(ops, wide_gemm):
    """The model's linear takes the C++ kernel up to kernel_rows() rows and torch's GEMM past
    them: 256 rows (8 past 1024 inputs) beside an 8-wide torch GEMM, 12 (4) beside AVX-512."""
    from types import SimpleNamespace

    from piston_cpu import layer_kernels

    calls = []

    def counted(x, w, b=None):
        calls.append(x.shape[0])
        return ops.linear(x, w, b)

    linear = layer_kernels.make_linear(SimpleNamespace(linear=counted), wide_gemm=wide_gemm)
    expected = {576: 12 if wide_gemm else 256, 1536: 4 if wide_gemm else 8}
    for in_features, limit in expected.items():
        assert layer_kernels.kernel_rows(in_features, wide_gemm) == limit
        w = torch.randn(40, in_features)
        for rows in (1, limit, limit + 1):
            calls.clear()
            x = torch.randn(rows, in_features)
            torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=2e-4, rtol=1e-5)
            assert calls == ([rows] if rows <= limit else [])


def test_large_linear_results_reuse_one_buffer_only_when_released(ops):
    """torch's GEMM writes results of 32 MB or more (the logits) into a kept buffer, the same
    numbers as F.linear; a result still held (or a view of it) is never overwritten."""
    from piston_cpu import layer_kernels

    linear = layer_kernels.make_linear(ops, wide_gemm=True)
    w = torch.randn(32768, 64)
    x = torch.randn(300, 64)  # 300 x 32768 floats: 37.5 MiB
    first = linear(x, w)
    assert torch.equal(first, F.linear(x, w))
    address = first.data_ptr()
    del first
    again = linear(x, w)
    assert again.data_ptr() == address  # released: the buffer again
    held = again[:, :100]  # a view keeps it in use
    del again
    kept = held.clone()
    x2 = torch.randn(300, 64)
    fresh = linear(x2, w)
    assert fresh.data_ptr() != address and torch.equal(held, kept)
    assert torch.equal(fresh, F.linear(x2, w))
    del held, fresh
    smaller = linear(x[:260], w)  # fewer rows, still 32 MiB or more: the same buffer
    assert smaller.data_ptr() == address and torch.equal(smaller, F.linear(x[:260], w))
    small = linear(x[:100], w[:1000])  # under 32 MB: torch's own allocation
    assert small.data_ptr() != address


@pytest.mark.parametrize("hidden", [576, 13, 64])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(ops, hidden, with_residual):
    from piston.models.layers.layernorm import RMSNorm

    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.data.normal_()
    x, residual = torch.randn(5, hidden) * 3, torch.randn(5, hidden)
    out, summed = ops.rms_norm(x, residual if with_residual else None, norm.weight, norm.eps)
    if with_residual:
        ref_out, ref_sum = norm(x, residual)
        torch.testing.assert_close(summed, ref_sum, atol=0, rtol=0)
    else:
        ref_out = norm(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [1536, 20])
def test_silu_and_mul_matches_torch(ops, width):
    torch.manual_seed(width)
    x = torch.randn(7, 2 * width) * 6
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.0])  # saturation and zero
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 64), (32, 24)])
def test_rotary_matches_torch(ops, head_dim, rotary_dim):
    from types import SimpleNamespace

    from piston.models.layers.rotary_embedding import get_rope

    torch.manual_seed(head_dim)
    config = SimpleNamespace(rope_theta=10000.0, max_position_embeddings=4096,
                             partial_rotary_factor=rotary_dim / head_dim)
    rope = get_rope(config, head_dim)
    qkv = torch.randn(6, (4 + 2 + 2) * head_dim)
    q, k = qkv[:, :4 * head_dim], qkv[:, 4 * head_dim:6 * head_dim]
    positions = torch.tensor([0, 1, 17, 400, 4095, 3])
    ref_q, ref_k = rope(positions, q.clone(), k.clone())
    ops.rotary_neox(positions, q, k, rope.cos_sin_cache, head_dim, rotary_dim)  # in place, on views
    torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, ref_k, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.rotary_neox(torch.tensor([4096]), q[:1], k[:1], rope.cos_sin_cache, head_dim, rotary_dim)


def test_paged_attention_rejects_bad_tables(ops):
    cache = torch.zeros(4, 16, 1, 64)
    q, kv = torch.randn(1, 64), torch.randn(1, 64)

    def call(table, seq_idx, ctx, slot=5):
        ops.paged_attention(q, kv, kv, cache, cache, torch.tensor([slot]), torch.tensor(table, dtype=torch.int32),
                            torch.tensor(seq_idx, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32), 1, 0.125, 0)

    with pytest.raises(RuntimeError, match="does not fit"):
        call([[0]], [0], [17])  # 17 tokens, one 16-token block
    with pytest.raises(RuntimeError, match="out of range"):
        call([[0, 9]], [0], [17])  # block 9 of 4
    with pytest.raises(RuntimeError, match="not in the block table"):
        call([[0]], [1], [3])
    with pytest.raises(RuntimeError, match="outside the cache"):
        call([[0]], [0], [3], slot=64)
    call([[2, 9]], [0], [16])  # the unused entry is never read


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_rounds_kv_into_a_16bit_cache_as_torch_does(ops, dtype):
    """The step's K/V written to a float16 or bfloat16 cache equal torch's .to(): round to
    nearest even at the halfway points, overflow to inf, infinities, NaN, subnormals."""
    torch.manual_seed(0)
    special = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 65520.0, -1e6, 3e38,
                            float("inf"), float("-inf"), float("nan"), 1e-7, -2 ** -140, 0.0, -0.0, 7.0, 1e-30])
    rows = torch.cat([special, torch.randn(64 * 6 - 16) * torch.logspace(-6, 6, 64 * 6 - 16)]).view(6, 64)
    cache = torch.zeros(2, 2, 16, 1, 64, dtype=dtype)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    ops.paged_attention(torch.zeros(6, 64), rows, -rows, cache[0], cache[1], torch.arange(6) + 9, table,
                        torch.zeros(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32), 1, 0.125, 0)
    written = cache.view(2, 32, 64)[:, 9:15]
    expected = torch.stack([rows.to(dtype), (-rows).to(dtype)])
    assert torch.equal(written.isnan(), expected.isnan())
    assert torch.equal(written.nan_to_num(0.0).view(torch.int16), expected.nan_to_num(0.0).view(torch.int16))


def test_model_with_kernels_matches_torch_path(ops, random_llama):
    """A tiny Llama's hidden states and logits with every layer kernel equal torch's."""
    from piston_cpu import layer_kernels

    model = random_llama
    ids, positions = torch.randint(0, 300, (9,)), torch.arange(9)
    with torch.inference_mode():
        ref_h = model(ids, positions)
        ref_logits = model.compute_logits(ref_h)
        # 4 linears and 2 norms a layer, the final norm, the shared RoPE, 2 MLPs, embedding, lm_head.
        assert layer_kernels.install(model, ops) == 8 + 4 + 1 + 1 + 2 + 2
        h = model(ids, positions)
        logits = model.compute_logits(h)
    torch.testing.assert_close(h, ref_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_engine_with_kernels_matches_torch_fallback(name, tiny_models, make_llm, monkeypatch):
    """Greedy tokens and logprobs of the engine with the kernels equal those with
    PISTON_CPU_KERNELS=0 (torch's ops, SDPA attention): mixed prefill and decode steps,
    chunked prompts (max_num_batched_tokens=16) and Qwen3's per-head q/k norms."""
    from piston import SamplingParams

    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hi",
               "List three primary colors, then explain why the sky is blue in two sentences:"]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    kwargs = dict(max_model_len=512, kv_cache_memory="64MiB", seed=0, dtype="float32",
                  max_num_batched_tokens=16)
    path = tiny_models(name)
    llm = make_llm(path, **kwargs)
    info = llm.collective_rpc("kernel_info")[0]
    assert info["attention"] == "cpu_paged_kernel" and info["layers"] > 0
    assert info["decoder_stack"] is True
    fast = llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("PISTON_CPU_KERNELS", "0")
    llm = make_llm(path, **kwargs)
    assert llm.collective_rpc("kernel_info")[0] == {"attention": "cpu_sdpa", "layers": 0, "decoder_stack": False,
                                                      "decoder_stack_steps": 0, "packed_weights": 0,
                                                      "greedy_head": {"rows": 0, "candidates": 0, "full_rows": 0}}
    slow = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fast, slow):
        oa, ob = a.outputs[0], b.outputs[0]
        assert oa.token_ids == ob.token_ids, a.prompt
        for step_a, step_b, token in zip(oa.logprobs, ob.logprobs, oa.token_ids):
            assert step_a[token].logprob == pytest.approx(step_b[token].logprob, abs=1e-4)


@pytest.mark.parametrize("shape", [(1, 49152), (7, 13), (64, 1000), (3, 8)])
def test_argmax_rows_equals_torch_argmax(ops, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))


def test_argmax_rows_keeps_torchs_ties_infinities_and_nans(ops):
    x = torch.zeros(6, 21)
    x[1, 3] = x[1, 17] = 1.0  # equal maxima: the first wins
    x[2] = float("-inf")  # all -inf: index 0
    x[3, 19] = x[3, 9] = float("nan")  # a NaN counts as the largest: the first NaN
    x[4, 20] = 5.0  # in the scalar tail past the last 8-wide block
    x[5, 2], x[5, 11] = -0.0, 0.0  # zeros of both signs compare equal
    x[5] -= 1.0
    x[5, 2], x[5, 11] = -0.0, 0.0
    assert ops.argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == [0, 3, 0, 9, 20, 2]
    rows = torch.randn(4, 40)[:, ::2]  # rows that are not contiguous: not the kernel's
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.argmax_rows(rows)


@pytest.mark.parametrize("tokens,in_features,out_features,slices",
                         [(64, 576, 960, 3), (9, 72, 40, 2), (5, 1536, 576, 1), (1, 16, 13, 1)])
def test_lora_sgmv_matches_a_loop_over_tokens(ops, tokens, in_features, out_features, slices):
    """y[t] += x[t] @ A[s] @ B[s] per token of slot s (-1: untouched), B block-diagonal over
    the slices as a fused layer's stack holds it, slices of widths no multiple of 8."""
    import numpy as np
    from piston.models.layers.lora import build_lora_mapping

    torch.manual_seed(tokens)
    slots, rank = 4, 16
    x, y = torch.randn(tokens, in_features), torch.randn(tokens, out_features)
    a = torch.randn(slots, in_features, slices * rank)
    b = torch.randn(slots, slices * rank, out_features)
    bounds = [out_features * j // slices for j in range(slices)] + [out_features]
    for j in range(slices):
        b[:, j * rank:(j + 1) * rank, :bounds[j]] = 0
        b[:, j * rank:(j + 1) * rank, bounds[j + 1]:] = 0
    token_slots = (np.arange(tokens) * 3) % (slots + 1) - 1  # every slot, and tokens without one
    mapping = build_lora_mapping(token_slots.astype(np.int32), slots, torch.device("cpu"))
    expected = y.clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            expected[t] += (x[t].double() @ a[s].double() @ b[s].double()).float()
    if mapping is None:
        return
    ops.lora_sgmv(x, y, a, b, mapping.token_ids, mapping.slot_ends, torch.tensor(bounds, dtype=torch.int64))
    torch.testing.assert_close(y, expected, atol=1e-3, rtol=1e-4)

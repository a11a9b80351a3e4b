"""The CUDA platform's Triton kernels against plain-torch float64 references."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from paged_reference import kernel_dtypes, make_paged_batch, reference_attention, tolerance

pytest.importorskip("triton")

DTYPES = kernel_dtypes()
# (block_size, num_kv_heads, queries_per_kv, head_dim): MHA-like, GQA 4:1 with head_dim 128,
# and an odd group (3, as SmolLM2) with a block size that is not a power of two.
SHAPES = [(16, 2, 2, 64), (32, 1, 4, 128), (48, 2, 3, 64)]
# A mixed step: a fresh prompt, a chunk continuing a prompt, two decodes, a one-token prompt.
MIXED_QUERY_LENS = [37, 20, 1, 1, 1]
MIXED_CONTEXT_LENS = [0, 45, 70, 5, 0]


def _attend(b, out, **kwargs):
    from piston_cuda.kernels.paged_attention import paged_attention

    paged_attention(b.q, b.k_cache, b.v_cache, out, b.block_table, b.query_start_loc, b.seq_lens,
                    num_seqs=b.num_seqs, max_query_len=max(b.query_lens), scale=b.scale, **kwargs)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    err = (actual.double().cpu() - expected).abs().max().item()
    assert err <= tolerance(dtype), f"max abs error {err:.3g} > {tolerance(dtype):.1g} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_cache_write_places_each_token_at_its_slot(device, dtype):
    from piston_cuda.kernels.kv_cache_write import write_kv_cache

    num_blocks, block_size, kvh, d = 6, 16, 2, 64
    gen = torch.Generator().manual_seed(1)
    # k and v are column slices of one fused qkv row, as the model produces them.
    qkv = torch.randn(5, 3 * kvh * d, generator=gen).to(device, dtype)
    k, v = qkv[:, kvh * d:2 * kvh * d], qkv[:, 2 * kvh * d:]
    slots = torch.tensor([17, 3, -1, 95, 48], dtype=torch.int64, device=device)  # -1: padding row
    kv = torch.zeros(2, num_blocks, block_size, kvh, d, dtype=dtype, device=device)
    write_kv_cache(k, v, kv[0], kv[1], slots)
    expected = torch.zeros_like(kv).cpu()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[0, s // block_size, s % block_size] = k[i].cpu().view(kvh, d)
            expected[1, s // block_size, s % block_size] = v[i].cpu().view(kvh, d)
    assert torch.equal(kv.cpu(), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-kv{}-g{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_prefill_chunk_and_decode_batch_matches_reference(device, dtype, shape):
    block_size, kvh, qpk, d = shape
    b = make_paged_batch(MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, block_size=block_size, num_kv_heads=kvh,
                         queries_per_kv=qpk, head_dim=d, dtype=dtype, device=device, seed=block_size)
    out = torch.empty_like(b.q)
    lse = torch.empty(b.q.shape[1], b.q.shape[0], dtype=torch.float32, device=device)
    _attend(b, out, lse=lse)
    ref_out, ref_lse = reference_attention(b)
    _close(out, ref_out, dtype)
    _close(lse, ref_lse, torch.float32 if dtype == torch.float32 else torch.float16)


KV_CACHE_DTYPES = [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float16]


@pytest.mark.parametrize("cache_dtype", KV_CACHE_DTYPES, ids=str)
def test_a_16bit_cache_under_a_float32_model_is_written_rounded_and_read_widened(device, cache_dtype):
    """--kv-cache-dtype float16|bfloat16 with float32 q: the write kernel rounds k/v as torch's
    .to() does, and attention over the 16-bit cache equals the float64 reference over the
    rounded keys and values at float32's tolerance (the split-KV path too)."""
    import dataclasses

    from piston_cuda.kernels.kv_cache_write import write_kv_cache

    k = torch.randn(5, 128, generator=torch.Generator().manual_seed(3)).to(device)
    v = -k
    kv = torch.zeros(2, 6, 16, 2, 64, dtype=cache_dtype, device=device)
    write_kv_cache(k, v, kv[0], kv[1], torch.tensor([17, 3, -1, 95, 48], dtype=torch.int64, device=device))
    assert torch.equal(kv[0].view(-1, 128)[[17, 3, 95, 48]], k[[0, 1, 3, 4]].to(cache_dtype))
    for query_lens, context_lens, num_splits in ((MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 1), ([1, 1], [300, 20], 4)):
        b = make_paged_batch(query_lens, context_lens, block_size=16, num_kv_heads=2, queries_per_kv=3, head_dim=64,
                             dtype=torch.float32, device=device, seed=7)
        b = dataclasses.replace(b, k_cache=b.k_cache.to(cache_dtype), v_cache=b.v_cache.to(cache_dtype))
        out = torch.empty_like(b.q)
        _attend(b, out, num_splits=num_splits)
        _close(out, reference_attention(b)[0], torch.float32)


def _garbage_before_windows(b, window: int):
    """The float64 reference with ``window``, then every block wholly before every query's
    window pointed at a block of huge values, which would show if any were read unmasked."""
    expected = reference_attention(b, window=window)
    garbage = next(i for i in range(b.k_cache.shape[0]) if i not in set(b.block_table.flatten().tolist()))
    b.k_cache[garbage] = 1e4
    b.v_cache[garbage] = 1e4
    for i, ctx in enumerate(b.context_lens):
        b.block_table[i, :max(0, ctx - window + 1) // b.block_size] = garbage
    return expected


@pytest.mark.parametrize("window", [1, 7, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_masks_and_skips_keys_before_it(device, dtype, window):
    """Each query sees its last ``window`` positions: the mixed batch, and a decode-only
    batch on the split-KV path."""
    for query_lens, context_lens, num_splits in ((MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 1),
                                                 ([1, 1], [300, 20], 4)):
        b = make_paged_batch(query_lens, context_lens, block_size=16, num_kv_heads=2, queries_per_kv=2,
                             head_dim=64, dtype=dtype, device=device, seed=5)
        ref_out, ref_lse = _garbage_before_windows(b, window)
        out = torch.empty_like(b.q)
        lse = torch.empty(b.q.shape[1], b.q.shape[0], dtype=torch.float32, device=device)
        _attend(b, out, lse=lse, num_splits=num_splits, window=window)
        _close(out, ref_out, dtype)
        _close(lse, ref_lse, torch.float32 if dtype == torch.float32 else torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_kv_decode_matches_single_pass(device, dtype):
    # Long and short contexts: with 4 splits the short one leaves splits without keys.
    b = make_paged_batch([1, 1, 1], [300, 3, 129], block_size=16, num_kv_heads=2, queries_per_kv=4,
                         head_dim=64, dtype=dtype, device=device, seed=7)
    ref_out, ref_lse = reference_attention(b)
    for num_splits in (1, 4):
        out = torch.empty_like(b.q)
        lse = torch.empty(b.q.shape[1], b.q.shape[0], dtype=torch.float32, device=device)
        _attend(b, out, lse=lse, num_splits=num_splits)
        _close(out, ref_out, dtype)
        _close(lse, ref_lse, torch.float32 if dtype == torch.float32 else torch.float16)


def test_num_kv_splits_only_for_small_long_decode_batches():
    from piston_cuda.kernels.paged_attention import num_kv_splits

    assert num_kv_splits(2, 8, 1, 8192, num_sms=132) == 8  # 16 programs on 132 SMs: split
    assert num_kv_splits(2, 8, 1, 600, num_sms=132) == 2  # limited by 256 keys per split
    assert num_kv_splits(64, 8, 1, 8192, num_sms=132) == 1  # enough programs already
    assert num_kv_splits(2, 8, 7, 8192, num_sms=132) == 1  # not a decode-only batch
    assert num_kv_splits(2, 8, 1, 300, num_sms=132) == 1  # context too short
    assert num_kv_splits(1, 1, 1, 1 << 20, num_sms=132) == 16  # capped


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_of_prefix_and_suffix_passes_equals_full_attention(device, dtype):
    """Cascade at kernel level: queries of every sequence over a shared 64-token prefix (one
    non-causal pass), each over its own suffix (kv_start), merged by log-sum-exp."""
    from piston_cuda.kernels.merge_attn_states import merge_attn_states
    from piston_cuda.kernels.paged_attention import paged_attention

    prefix_blocks, bs = 4, 16
    b = make_paged_batch([1, 6, 1, 9], [70, 64, 100, 80], block_size=bs, num_kv_heads=2, queries_per_kv=2,
                         head_dim=64, dtype=dtype, device=device, seed=3, shared_prefix_blocks=prefix_blocks)
    prefix_len = prefix_blocks * bs
    n, h, d = b.q.shape
    parts = []
    for kwargs in (dict(causal=False), dict(kv_start=prefix_len)):
        part = torch.empty(n, h, d, dtype=torch.float32, device=device)
        lse = torch.empty(h, n, dtype=torch.float32, device=device)
        parts += [part, lse]
        if "causal" in kwargs:
            qsl = torch.tensor([0, n], dtype=torch.int32, device=device)
            lens = torch.tensor([prefix_len], dtype=torch.int32, device=device)
            paged_attention(b.q, b.k_cache, b.v_cache, part, b.block_table[:1, :prefix_blocks], qsl, lens,
                            num_seqs=1, max_query_len=n, scale=b.scale, lse=lse, **kwargs)
        else:
            _attend(b, part, lse=lse, **kwargs)
    out = torch.empty_like(b.q)
    out_lse = torch.empty(h, n, dtype=torch.float32, device=device)
    merge_attn_states(out, *parts, out_lse=out_lse)
    ref_out, ref_lse = reference_attention(b)
    _close(out, ref_out, dtype)
    _close(out_lse, ref_lse, torch.float32 if dtype == torch.float32 else torch.float16)


def test_merge_treats_rows_without_keys_as_empty(device):
    from piston_cuda.kernels.merge_attn_states import merge_attn_states

    a = torch.randn(3, 2, 16, device=device)
    b = torch.randn(3, 2, 16, device=device)
    inf = float("inf")
    a_lse = torch.tensor([[0.5, -inf, inf], [1.0, 2.0, 0.0]], device=device)
    b_lse = torch.tensor([[-inf, 0.3, 1.0], [1.0, -inf, 0.0]], device=device)
    out = torch.empty_like(a)
    merge_attn_states(out, a, a_lse, b, b_lse)
    assert torch.allclose(out[0, 0], a[0, 0]) and torch.allclose(out[1, 0], b[1, 0])
    assert torch.allclose(out[2, 0], b[2, 0])  # +inf (FlashAttention's empty row) counts as empty
    assert torch.allclose(out[0, 1], (a[0, 1] + b[0, 1]) / 2, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_op_lets_the_backend_write_the_output_buffer(device, dtype):
    """The compiled model's attention call (``run_attention``, the op's body) hands its
    output buffer to the Triton backend, which writes the rows in place (no copy), and the
    padding rows past the step's tokens come out zero; the values are the backend's own."""
    from piston.attention.forward_context import ForwardContext, set_forward_context
    from piston.attention.metadata import CommonAttentionMetadata
    from piston.compilation.attention_op import run_attention
    from piston_cuda.attention.triton_attention import TritonAttention

    heads, kv_heads, d, bs, n, padded = 4, 2, 32, 16, 3, 4
    backend = TritonAttention(heads, kv_heads, d)
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 8, bs, kv_heads, d, generator=gen).to(device, dtype)
    seq_lens = np.array([5, 17, 9], dtype=np.int32)
    table = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int32)
    qsl = np.arange(n + 1, dtype=np.int32)
    pos = seq_lens - 1
    slots = table[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
    common = CommonAttentionMetadata(
        num_reqs=n, num_actual_tokens=n, max_query_len=1, max_seq_len=int(seq_lens.max()), query_start_loc_np=qsl,
        seq_lens_np=seq_lens, query_start_loc=torch.from_numpy(qsl).to(device),
        seq_lens=torch.from_numpy(seq_lens).to(device), block_table=torch.from_numpy(table).to(device),
        slot_mapping=torch.from_numpy(slots).to(device), block_size=bs)
    md = backend.build_metadata(common)
    layer = types.SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, scale=d ** -0.5)
    q = torch.randn(padded, heads * d, generator=gen).to(device, dtype)
    k = torch.randn(padded, kv_heads * d, generator=gen).to(device, dtype)
    v = torch.randn(padded, kv_heads * d, generator=gen).to(device, dtype)
    expected = backend.forward(layer, q, k, v, kv.clone(), md)
    buffer = torch.empty(padded, heads * d, dtype=dtype, device=device)
    assert backend.forward(layer, q, k, v, kv.clone(), md, output=buffer).data_ptr() == buffer.data_ptr()
    output = torch.full((padded, heads * d), 7.0, dtype=dtype, device=device)
    with set_forward_context(ForwardContext(md, [kv], backend, {0: layer})):
        run_attention(q, k, v, output, 0)
    _close(output[:n], expected, dtype)
    assert output[n:].eq(0).all()

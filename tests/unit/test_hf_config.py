"""Configs read without transformers carry the same values transformers gives them.

config.json files are saved with only their non-default values (save_pretrained's
use_diff), so Piston's defaults for each native architecture must equal transformers'.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from piston.step.config import hf_head_dim, hf_num_kv_heads  # noqa: E402
from piston.step.hf_config import load_hf_config  # noqa: E402
from piston.step.hf_defaults import HF_DEFAULTS, complete  # noqa: E402
from piston.step.layer_types import (  # noqa: E402
    FULL, SLIDING, kv_lookback, layer_types, rope_config, sliding_windows)
from piston.step.plain_config import PlainConfig  # noqa: E402
from piston.step.rope import rope_tables  # noqa: E402

CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma3_text": "Gemma3TextConfig"}
READ = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
        "mlp_bias", "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")


@pytest.mark.parametrize("model_type", list(HF_DEFAULTS))
def test_defaults_equal_transformers_config_classes(model_type):
    reference = getattr(transformers, CLASSES[model_type])().to_dict()
    ours = HF_DEFAULTS[model_type]
    for key, value in ours.items():
        # Derived: the head counts (below), Gemma 3's layer types and RoPE (piston.step.layer_types).
        if key in reference and key not in ("num_key_value_heads", "head_dim", "layer_types", "rope_parameters"):
            assert value == reference[key], f"{model_type}.{key}: {value!r} != transformers {reference[key]!r}"
    if model_type == "gemma3_text":
        assert layer_types(PlainConfig(complete(model_type, {}))) == reference["layer_types"]
    else:
        assert reference.get("rope_parameters", {}).get("rope_theta", 10000.0) == ours["rope_theta"]


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)),
    ("llama", dict(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("mistral", dict(hidden_size=64, num_attention_heads=4, sliding_window=None, head_dim=8)),
    ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)),
    ("qwen3", dict(hidden_size=64, num_attention_heads=4, head_dim=32, rope_theta=500000.0)),
    ("qwen3", dict(hidden_size=64, num_attention_heads=4, head_dim=32, use_sliding_window=True, sliding_window=32,
                   max_window_layers=2, num_hidden_layers=4)),
    ("mistral", dict(hidden_size=64, num_attention_heads=4, sliding_window=48, num_hidden_layers=2)),
    ("gemma3_text", dict(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=7,
                         sliding_window=24)),
    ("gemma3_text", dict(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=4,
                         sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 8.0},
                         rope_local_base_freq=20000.0, rope_theta=5e5)),
])
def test_a_config_saved_with_only_its_differences_reads_the_same(model_type, overrides, tmp_path):
    reference = getattr(transformers, CLASSES[model_type])(**overrides)
    reference.save_pretrained(tmp_path)  # use_diff: defaults are left out of config.json
    ours = load_hf_config(str(tmp_path))
    for key in READ:
        assert getattr(ours, key, None) == getattr(reference, key, None), key
    # Derived facts (transformers' Qwen2Config has no head_dim attribute at all).
    assert (hf_head_dim(ours), hf_num_kv_heads(ours)) == (hf_head_dim(reference), hf_num_kv_heads(reference))
    head_dim = hf_head_dim(ours)
    # Which layers slide, and each kind of layer's RoPE, as transformers' modelling code has them.
    window = getattr(reference, "sliding_window", None)
    assert layer_types(ours) == list(getattr(reference, "layer_types", None) or [
        SLIDING if window else FULL] * reference.num_hidden_layers)
    assert sliding_windows(ours) == [window if t == SLIDING else None for t in layer_types(ours)]
    # The KV cache frees blocks behind the window only when no layer reads the whole context.
    assert kv_lookback(ours) == (window if set(layer_types(ours)) == {SLIDING} else None)
    for kind in (FULL, SLIDING):
        ours_rope = rope_tables(rope_config(ours, kind), head_dim, 256)
        ref_rope = rope_tables(_rope_reference(reference, kind), head_dim, 256)
        assert (ours_rope.cos == ref_rope.cos).all() and (ours_rope.sin == ref_rope.sin).all()


def _rope_reference(reference, kind):
    """transformers' own RoPE settings of ``kind`` layers: Gemma 3 keeps one dict per kind."""
    params = reference.rope_parameters
    if isinstance(params, dict) and kind in params:
        return PlainConfig({"rope_parameters": params[kind],
                            "max_position_embeddings": reference.max_position_embeddings})
    return reference

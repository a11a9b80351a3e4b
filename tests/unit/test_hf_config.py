"""Configs read without transformers carry the same values transformers gives them.

config.json files are saved with only their non-default values (save_pretrained's
use_diff), so Piston's defaults for each native architecture must equal transformers'.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from piston.step.config import hf_head_dim, hf_num_kv_heads  # noqa: E402
from piston.step.hf_config import load_hf_config  # noqa: E402
from piston.step.hf_defaults import HF_DEFAULTS  # noqa: E402
from piston.step.rope import rope_tables  # noqa: E402

CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
READ = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
        "mlp_bias", "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")


@pytest.mark.parametrize("model_type", list(HF_DEFAULTS))
def test_defaults_equal_transformers_config_classes(model_type):
    reference = getattr(transformers, CLASSES[model_type])().to_dict()
    ours = HF_DEFAULTS[model_type]
    for key, value in ours.items():
        if key in reference and key not in ("num_key_value_heads", "head_dim"):  # derived below
            assert value == reference[key], f"{model_type}.{key}: {value!r} != transformers {reference[key]!r}"
    assert reference.get("rope_parameters", {}).get("rope_theta", 10000.0) == ours["rope_theta"]


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)),
    ("llama", dict(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("mistral", dict(hidden_size=64, num_attention_heads=4, sliding_window=None, head_dim=8)),
    ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)),
    ("qwen3", dict(hidden_size=64, num_attention_heads=4, head_dim=32, rope_theta=500000.0)),
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
    ours_rope, ref_rope = rope_tables(ours, head_dim, 256), rope_tables(reference, head_dim, 256)
    assert (ours_rope.cos == ref_rope.cos).all() and (ours_rope.sin == ref_rope.sin).all()

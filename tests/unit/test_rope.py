"""The step layer's numpy RoPE tables equal transformers' rotary embedding, and both
platforms use exactly those tables (the torch models' cos/sin cache is the same numbers)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from piston.models.layers.rotary_embedding import get_rope  # noqa: E402
from piston.step.rope import rope_tables  # noqa: E402

ROPE_CASES = {
    "default": {},
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                   rope_theta=500000.0),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_tables_match_transformers_rotary_embedding(name):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512,
                                      **ROPE_CASES[name])
    tables = rope_tables(config, 32)
    reference = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    if name == "dynamic":
        # transformers rescales for the longest position it is given: ask one position at a
        # time, so position p uses the frequencies of a sequence of length p + 1, as we do.
        positions = [0, 5, 100, 511, 600, 900, len(tables.cos) - 1]
        got = [reference(x, torch.tensor([[p]])) for p in positions]
        cos = np.stack([c[0, 0].numpy() for c, _ in got])
        sin = np.stack([s[0, 0].numpy() for _, s in got])
        ours_cos, ours_sin = tables.cos[positions], tables.sin[positions]
        # Past the original context the per-position float32 powers may differ by an ulp
        # between numpy and torch; the angle (position x frequency) carries it to ~1e-5.
        atol = 1e-4
    else:
        cos, sin = (t[0].numpy() for t in reference(x, torch.arange(len(tables.cos))[None]))
        ours_cos, ours_sin = tables.cos, tables.sin
        atol = 2e-6
    half = tables.rotary_dim // 2
    np.testing.assert_allclose(ours_cos, cos[:, :half], atol=atol, rtol=0)
    np.testing.assert_allclose(ours_sin, sin[:, :half], atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_torch_models_use_the_step_layer_tables(name):
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512,
                                      **ROPE_CASES[name])
    rope = get_rope(config, 32)
    tables = rope_tables(config, 32)
    assert rope.rotary_dim == tables.rotary_dim
    np.testing.assert_array_equal(rope.cos_sin_cache.numpy(), np.concatenate((tables.cos, tables.sin), axis=-1))


def test_unknown_rope_type_is_rejected_naming_the_supported_ones():
    config = SimpleNamespace(rope_scaling={"rope_type": "longrope", "factor": 2.0}, max_position_embeddings=64)
    with pytest.raises(ValueError, match="supported: default"):
        rope_tables(config, 64)

"""The TPU platform's numpy RoPE tables equal the torch models' cos/sin cache."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("jax")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from piston.model_executor.layers.rotary_embedding import get_rope  # noqa: E402
from piston_tpu.rope import rope_tables  # noqa: E402

ROPE_CASES = {
    "default": {},
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                   rope_theta=500000.0),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_tables_match_torch_cos_sin_cache(name):
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512,
                                      **ROPE_CASES[name])
    rope = get_rope(config, 32)
    tables = rope_tables(config, 32)
    cos, sin = rope.cos_sin_cache.numpy().reshape(rope.cos_sin_cache.shape[0], 2, -1).transpose(1, 0, 2)
    n = min(len(cos), len(tables.cos))
    assert tables.rotary_dim == rope.rotary_dim
    # Past the original context, dynamic NTK's per-position float32 powers may differ by an
    # ulp between numpy and torch; the angle (position x frequency) carries it to ~1e-4.
    atol = 1e-4 if name == "dynamic" else 2e-6
    np.testing.assert_allclose(tables.cos[:n], cos[:n], atol=atol, rtol=0)
    np.testing.assert_allclose(tables.sin[:n], sin[:n], atol=atol, rtol=0)


def test_unknown_rope_type_is_rejected_naming_the_supported_ones():
    config = SimpleNamespace(rope_scaling={"rope_type": "longrope", "factor": 2.0}, max_position_embeddings=64)
    with pytest.raises(ValueError, match="supported: default"):
        rope_tables(config, 64)

"""Each natively supported architecture's config defaults, as transformers' config classes
have them (transformers 5), so a config.json saved with only its non-default values reads
the same here without importing transformers. tests/unit/test_hf_config.py checks these
against transformers' own classes.
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = dict(
    hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, attention_dropout=0.0, num_key_value_heads=None, head_dim=None,
    pad_token_id=None, architectures=None,
)

HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
              "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1, "attention_bias": False,
              "mlp_bias": False},
    "mistral": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2,
                "sliding_window": 4096},
    "qwen2": {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
              "bos_token_id": None, "eos_token_id": None},
    "qwen3": {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "head_dim": 128,
              "max_position_embeddings": 32768, "attention_bias": False, "use_sliding_window": False,
              "sliding_window": None, "max_window_layers": 28, "bos_token_id": None, "eos_token_id": None},
    # Gemma 3's text model. Its RoPE settings stay unset here: piston.step.layer_types reads
    # the per-layer-type ``rope_parameters`` of a transformers-5 config.json, or else the
    # older rope_theta / rope_local_base_freq / rope_scaling with Gemma 3's own defaults.
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
                    "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False,
                    "attention_dropout": 0.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "layer_types": None, "final_logit_softcapping": None, "attn_logit_softcapping": None,
                    "use_bidirectional_attention": False, "rope_parameters": None, "architectures": None},
}


def complete(model_type: str, values: dict[str, Any]) -> dict[str, Any] | None:
    """``values`` with the architecture's defaults and derived fields filled in, or None
    for a model type without a table here (transformers must read it)."""
    defaults = HF_DEFAULTS.get(model_type)
    if defaults is None:
        return None
    config = {**defaults, **values, "model_type": model_type}
    if config.get("num_key_value_heads") is None:
        config["num_key_value_heads"] = config["num_attention_heads"]
    if config.get("head_dim") is None:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config

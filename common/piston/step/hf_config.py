"""A checkpoint's Hugging Face config: from a folder's config.json or a GGUF file's metadata."""

from __future__ import annotations

from typing import Any

from piston.step.gguf_metadata import config_from_gguf


def load_hf_config(path: str) -> Any:
    """The transformers config of the model folder or .gguf file at ``path``."""
    if path.endswith(".gguf"):
        return config_from_gguf(path)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def native_context_length(hf_config: Any) -> int:
    """The context length the model was trained for (2048 when the config names none)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048

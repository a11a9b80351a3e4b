"""A checkpoint's Hugging Face config: from a folder's config.json or a GGUF file's metadata.

For the architectures Piston runs natively the config is read without transformers
(``hf_defaults`` fills in what config.json leaves out): a ``PlainConfig`` of plain
attributes. Importing transformers costs seconds of start-up, and torch with it; it is
used only for a model type without a defaults table. The processes the front end starts
get the same complete values as a PlainConfig, too.
"""

from __future__ import annotations

import json
import os
from typing import Any

from piston.step.gguf_metadata import config_from_gguf
from piston.step.hf_defaults import complete
from piston.step.plain_config import PlainConfig


def load_hf_config(path: str) -> Any:
    """The Hugging Face config of the model folder or .gguf file at ``path``."""
    if path.endswith(".gguf"):
        return config_from_gguf(path)
    file = os.path.join(path, "config.json")
    if os.path.isfile(file):
        with open(file) as f:
            raw = json.load(f)
        values = complete(raw.get("model_type", ""), raw)
        if values is not None:
            return PlainConfig(values)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def native_context_length(hf_config: Any) -> int:
    """The context length the model was trained for (2048 when the config names none)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


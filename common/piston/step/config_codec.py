"""The EngineConfig as bytes, for the engine and worker processes (JSON, never pickle).

The model's Hugging Face config (and a draft model's) travels inside, complete (defaults
included), and comes out as a PlainConfig: a child process neither re-reads the checkpoint
(a GGUF file's metadata takes seconds to parse) nor imports transformers to rebuild a
config class.
"""

from __future__ import annotations

import dataclasses
import json

import msgspec

from piston.step.config import EngineConfig
from piston.step.plain_config import PlainConfig


def encode_engine_config(config: EngineConfig) -> bytes:
    hf = config.model_config.hf_config
    mc = dataclasses.replace(config.model_config, hf_config=None)
    spec, draft_hf = config.speculative_config, None
    if spec is not None and spec.draft_model_config is not None:
        draft_hf = spec.draft_model_config.hf_config
        spec = dataclasses.replace(spec, draft_model_config=dataclasses.replace(spec.draft_model_config,
                                                                                hf_config=None))
    payload = {
        "config": msgspec.to_builtins(dataclasses.replace(config, model_config=mc, speculative_config=spec)),
        "hf_config": _hf_json(hf),
        "draft_hf_config": _hf_json(draft_hf),
    }
    return msgspec.json.encode(payload)


def _hf_json(hf) -> dict | None:
    if hf is None:
        return None
    values = json.loads(hf.to_json_string(use_diff=False))
    # A PlainConfig has no attribute_map: keep transformers' aliases (GPT-2's n_layer is num_hidden_layers).
    for alias in getattr(hf, "attribute_map", None) or {}:
        values.setdefault(alias, getattr(hf, alias))
    return values


def decode_engine_config(data: bytes) -> EngineConfig:
    """The inverse of ``encode_engine_config``."""
    payload = msgspec.json.decode(data)
    config = msgspec.convert(payload["config"], EngineConfig)
    hf = payload["hf_config"]
    if hf is not None:
        config.model_config.hf_config = PlainConfig(hf)
    draft_hf = payload.get("draft_hf_config")
    if draft_hf is not None:
        config.speculative_config.draft_model_config.hf_config = PlainConfig(draft_hf)
    return config

"""The EngineConfig as bytes, for the engine and worker processes (JSON, never pickle).

The model's Hugging Face config travels inside, as its own JSON, so a child process
rebuilds it in microseconds instead of re-reading the checkpoint (a GGUF file's metadata
takes seconds to parse).
"""

from __future__ import annotations

import dataclasses
import json

import msgspec

from piston.step.config import EngineConfig


def encode_engine_config(config: EngineConfig) -> bytes:
    hf = config.model_config.hf_config
    mc = dataclasses.replace(config.model_config, hf_config=None)
    payload = {
        "config": msgspec.to_builtins(dataclasses.replace(config, model_config=mc)),
        "hf_config": None if hf is None else json.loads(hf.to_json_string(use_diff=False)),
    }
    return msgspec.json.encode(payload)


def decode_engine_config(data: bytes) -> EngineConfig:
    """The inverse of ``encode_engine_config``."""
    payload = msgspec.json.decode(data)
    config = msgspec.convert(payload["config"], EngineConfig)
    hf = payload["hf_config"]
    if hf is not None:
        from transformers import AutoConfig

        config.model_config.hf_config = AutoConfig.for_model(**hf)
    return config

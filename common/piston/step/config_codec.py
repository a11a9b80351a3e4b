"""The EngineConfig as bytes, for the engine and worker processes (JSON, never pickle).

The model's Hugging Face config travels inside, complete (defaults included), and comes
out as a PlainConfig: a child process neither re-reads the checkpoint (a GGUF file's
metadata takes seconds to parse) nor imports transformers to rebuild a config class.
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
        config.model_config.hf_config = PlainConfig(hf)
    return config

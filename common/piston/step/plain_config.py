"""PlainConfig: a Hugging Face config as plain attributes, without transformers."""

from __future__ import annotations

import json
from typing import Any


class PlainConfig:
    """A Hugging Face config as plain attributes, built from a complete ``to_dict()`` (every
    default already filled in), with the few methods Piston calls on a config."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str, use_diff: bool = False) -> None:
        with open(path, "w") as f:
            f.write(self.to_json_string())

    def __repr__(self) -> str:
        return f"PlainConfig({getattr(self, 'model_type', '?')}, {getattr(self, 'architectures', None)})"

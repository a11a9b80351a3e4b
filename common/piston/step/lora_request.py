"""LoRARequest: which LoRA adapter a request runs with (vLLM's ``LoRARequest``).

Torch-free and a msgspec struct: it travels with the request from the front end to the
EngineCore and on to every worker, which loads the adapter's weights from ``lora_path``
itself (each tensor-parallel rank reads its own shard).
"""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """``lora_name``: what clients call it (``model`` in an OpenAI request); ``lora_int_id``:
    a positive id, unique among the adapters the engine has seen, which the prefix cache keys
    blocks by and the workers cache weights under; ``lora_path``: the PEFT adapter's folder
    (``adapter_config.json`` and ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}.")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string.")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path must name the adapter's folder.")

    @property
    def cache_key(self) -> tuple:
        """The prefix cache's extra key for this adapter's blocks: two adapters never share
        KV for the same tokens (an id reused for another folder is another adapter; the same
        folder rewritten under the same id and name is not told apart: reset the prefix cache)."""
        return ("lora", self.lora_int_id, self.lora_name, self.lora_path)

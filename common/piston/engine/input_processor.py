"""InputProcessor: tokenizes and validates prompts on the front end, before the engine sees them."""

from __future__ import annotations

from typing import Sequence

from piston.step.config import EngineConfig
from piston.step.lora_adapter import LoRAModelDims, load_adapter
from piston.step.lora_request import LoRARequest
from piston.step.sampling_params import SamplingParams
from piston.structured_output.selection import validate as validate_structured_outputs

PromptType = str | Sequence[int]


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = config.model_config.max_model_len
        self.vocab_size = config.model_config.vocab_size
        max_logprobs = config.model_config.max_logprobs
        self.max_logprobs = self.vocab_size if max_logprobs < 0 else min(max_logprobs, self.vocab_size)
        self.structured_outputs_backend = config.structured_outputs_config.backend
        self.lora_config = config.lora_config
        self.hf_config = config.model_config.hf_config
        self._checked_loras: dict[int, LoRARequest] = {}

    def check_lora(self, lora_request: LoRARequest | None) -> None:
        """Check a request's adapter before the engine sees it (read once per adapter id):
        ValueError if LoRA is off, LoRAAdapterError if the adapter cannot be served."""
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}.")
        if self.lora_config is None:
            raise ValueError(f"lora_request {lora_request.lora_name!r}: LoRA adapters are off; start the engine "
                             "with enable_lora=True (--enable-lora).")
        known = self._checked_loras.get(lora_request.lora_int_id)
        if known == lora_request:
            return
        if known is not None:
            raise ValueError(f"lora_int_id {lora_request.lora_int_id} already names adapter {known.lora_name!r} "
                             f"({known.lora_path}); give each adapter its own id.")
        load_adapter(lora_request, LoRAModelDims.from_hf_config(self.hf_config), self.lora_config.max_lora_rank)
        self._checked_loras[lora_request.lora_int_id] = lora_request

    def lora_checked(self, lora_request: LoRARequest | None) -> bool:
        """Whether ``check_lora`` has nothing to do for it (no adapter, or one already read)."""
        return lora_request is None or self._checked_loras.get(lora_request.lora_int_id) == lora_request

    def forget_lora(self, lora_int_id: int) -> None:
        self._checked_loras.pop(lora_int_id, None)

    def process_prompt(self, prompt: PromptType, params: SamplingParams
                       ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate one prompt. Raises ValueError naming what is wrong.

        Returns (prompt text or None, prompt token ids, params with max_tokens resolved).
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}.")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character or token.")
            text, token_ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in prompt):
            text, token_ids = None, list(prompt)
        else:
            raise TypeError("prompt must be a string or a list of token ids, "
                            f"got {type(prompt).__name__}.")
        if not token_ids:
            raise ValueError("prompt is empty; give at least one character or token.")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for the model's "
                             f"vocabulary [0, {self.vocab_size}).")
        max_len, n = self.max_model_len, len(token_ids)
        if n >= max_len:
            raise ValueError(f"The prompt is {n} tokens long, but the model's context is "
                             f"max_model_len={max_len} tokens (room is needed for at least one "
                             "generated token); shorten the prompt.")
        if params.max_tokens is None:
            params = params.clone(max_tokens=max_len - n)
        elif n + params.max_tokens > max_len:
            raise ValueError(f"max_tokens={params.max_tokens} exceeds the model's context "
                             f"({max_len} - {n} prompt tokens = {max_len - n}).")
        for t in params.stop_token_ids or ():
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary "
                                 f"[0, {self.vocab_size}).")
        if params.structured_outputs is not None:  # a bad schema or grammar is a 400, before any engine work
            validate_structured_outputs(params.structured_outputs, self.structured_outputs_backend)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.max_logprobs:
                raise ValueError(f"{name}={k} exceeds the most logprobs this server returns per position, "
                                 f"max_logprobs={self.max_logprobs} (--max-logprobs).")
        return text, token_ids, params

    @staticmethod
    def child_params(params: SamplingParams) -> list[SamplingParams]:
        """One SamplingParams per engine request: ``n`` > 1 fans out into n children,
        child i seeded with ``seed + i`` so seeded requests stay reproducible."""
        if params.n == 1:
            return [params]
        return [params.clone(n=1, seed=None if params.seed is None else params.seed + i)
                for i in range(params.n)]

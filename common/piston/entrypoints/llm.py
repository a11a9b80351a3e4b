"""LLM: offline batched generation, the Python entry point."""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from piston.engine.arg_utils import EngineArgs
from piston.engine.llm_engine import LLMEngine, PromptType
from piston.step.lora_request import LoRARequest
from piston.outputs import RequestOutput
from piston.step.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """Generate from many prompts at once.

    ``LLM()`` loads the built-in default model (SmolLM2-135M-Instruct); ``model`` may
    be a Hugging Face folder, a .gguf file or a hub id. Other keyword arguments are
    ``EngineArgs`` fields (max_num_seqs, max_num_batched_tokens, kv_cache_memory, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to completion in one engine run; outputs keep the input order.

        A prompt is a string or a list of token ids. ``lora_request``: the LoRA adapter of
        every prompt, or one per prompt (None: the base model); needs ``enable_lora=True``.
        Every prompt and adapter is validated before any runs, so a bad one raises
        ValueError and leaves the engine untouched.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"sampling_params has {len(params_list)} entries for "
                                 f"{len(prompt_list)} prompts; give one or one per prompt.")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompt_list)} prompts.")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_list = [lora_request] * len(prompt_list)
        else:
            lora_list = list(lora_request)
            if len(lora_list) != len(prompt_list):
                raise ValueError(f"lora_request has {len(lora_list)} entries for {len(prompt_list)} prompts; "
                                 "give one or one per prompt.")
        engine = self.llm_engine
        if engine.sleeping:
            raise RuntimeError("The engine is asleep; call wake_up() before generating.")
        for lora in lora_list:
            engine.input_processor.check_lora(lora)
        processed = [engine.process_prompt(p, sp) for p, sp in zip(prompt_list, params_list)]
        ids = []
        for i, (text, token_ids, params) in enumerate(processed):
            request_id = engine.next_request_id()
            engine.add_processed_request(request_id, text, token_ids, params,
                                         priority[i] if priority else 0, lora_list[i])
            ids.append(request_id)
        try:
            finished = self._run_engine(len(ids), use_tqdm)
        except BaseException:
            engine.abort_request(ids)
            raise
        return [finished[i] for i in ids]

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("This model's tokenizer has no chat template; pass chat_template=...")
        prompts = []
        for conv in conversations:
            text = tokenizer.apply_chat_template(conv, tokenize=False, chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt)
            # The template already holds any special tokens the model expects.
            prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
        outputs = self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)
        for out in outputs:
            out.prompt = tokenizer.decode(out.prompt_token_ids)
        return outputs

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Check a LoRA adapter and read it into host memory ahead of its requests."""
        return self.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter's weights (requests running with it finish with it)."""
        return self.llm_engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        """The ids of the adapters the workers hold."""
        return set(self.llm_engine.list_loras())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Call ``method`` on every worker; returns one result per worker."""
        return self.llm_engine.collective_rpc(method, args, kwargs)

    # ----- for RLHF: sleep mode and weight updates ------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Give the device memory back while another job (training) uses it.

        Level 1 drops the KV cache and moves the weights off the device (to host memory;
        on the CPU platform to a temporary file, so the process's resident memory falls);
        ``wake_up`` brings them back as they were. Level 2 drops the weights too; waking
        them reloads the checkpoint, after which ``update_weights`` can install new ones.
        The prefix cache is emptied. ``generate`` raises until everything is awake.
        """
        self.llm_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what ``sleep`` released: ``tags=["weights"]`` or ``["kv_cache"]`` wakes
        one part (e.g. the weights first, to update them before the KV cache takes memory);
        None wakes both."""
        self.llm_engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.llm_engine.is_sleeping()

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Replace the model's weights in place with ``(name, tensor)`` pairs: Hugging Face
        names, full (unsharded) torch tensors or numpy arrays; each tensor-parallel rank
        takes its shard. Any subset of the weights may be given, in several calls. No
        restart: the engine's processes, compiled programs and graphs stay. The prefix
        cache is emptied. Returns how many tensors were applied; ValueError for a name the
        model lacks or a wrong shape (models with packed GGUF or int8 weights cannot be
        updated)."""
        return self.llm_engine.update_weights(named_tensors)

    def reload_weights(self) -> None:
        """Read the checkpoint's weights again (undoing ``update_weights``)."""
        self.llm_engine.reload_weights()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (blocks in use stay in use)."""
        return self.llm_engine.reset_prefix_cache()

    def _run_engine(self, num_requests: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=num_requests, desc="Processed prompts", unit="req", dynamic_ncols=True,
                   disable=not use_tqdm)
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step(final_only=True):
                finished[out.request_id] = out
                in_tokens += len(out.prompt_token_ids) * len(out.outputs)
                out_tokens += sum(len(c.token_ids) for c in out.outputs)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"input: {in_tokens / elapsed:.0f} tok/s, "
                                    f"output: {out_tokens / elapsed:.0f} tok/s", refresh=False)
                bar.update(1)
        bar.close()
        return finished


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if isinstance(prompts, Sequence):
        if not prompts:
            raise ValueError("prompts is empty; give at least one prompt.")
        return list(prompts)
    raise TypeError(f"prompts must be a string, a list of strings or token-id lists, got "
                    f"{type(prompts).__name__}.")

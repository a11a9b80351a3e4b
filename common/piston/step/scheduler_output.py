"""SchedulerOutput: one step's decision, sent to the workers as a diff."""

from __future__ import annotations

import msgspec

from piston.step.kv_transfer import KVTransfer
from piston.step.lora_request import LoRARequest
from piston.step.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, array_like=True, gc=False):
    """A request the workers have not seen (or must rebuild after preemption), in full."""

    req_id: str
    prompt_token_ids: list[int]
    # Tokens already generated: non-empty only when a preempted request resumes.
    output_token_ids: list[int]
    sampling_params: SamplingParams
    # Its blocks, one list per KV cache group (piston.step.kv_cache_layout; one group unless
    # the model is hybrid), each in sequence order.
    block_ids: list[list[int]]
    num_computed_tokens: int
    # The request's EOS token, which the sampler forbids until min_tokens are out.
    eos_token_id: int | None = None
    # The LoRA adapter it runs with (EngineConfig.lora_config); None: the base model.
    lora_request: LoRARequest | None = None


class RunningRequestData(msgspec.Struct, array_like=True, gc=False):
    """Requests the workers already hold from earlier steps: only what changed since the
    last step (new KV blocks and the computed count)."""

    req_ids: list[str] = []
    # Per request: its new blocks, one list per KV cache group.
    new_block_ids: list[list[list[int]]] = []
    num_computed_tokens: list[int] = []


class SchedulerOutput(msgspec.Struct, array_like=True, gc=False):
    scheduled_new_reqs: list[NewRequestData]
    scheduled_running_reqs: RunningRequestData
    # {request_id: number of tokens to compute this step}: the whole decision.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the workers must forget: finished, aborted or preempted since last step.
    finished_req_ids: list[str]
    # Blocks shared by every running request (for cascade attention).
    num_common_prefix_blocks: int = 0
    # Structured outputs: the requests that sample this step under a grammar, and their
    # packed token bitmasks, int32 [len(grammar_req_ids), ceil(vocab / 32)] as bytes (bit j of
    # word w set: token 32 * w + j allowed).
    grammar_req_ids: list[str] = []
    grammar_bitmask: bytes = b""
    # The KV offload tier's orders for this step (piston.step.kv_transfer), carried out
    # before the forward pass; None when there are none.
    kv_transfer: KVTransfer | None = None
    # Speculative decoding: {request_id: draft tokens} the step checks after the request's
    # last token (they are counted in num_scheduled_tokens); requests without drafts are absent.
    scheduled_spec_decode_tokens: dict[str, list[int]] = {}

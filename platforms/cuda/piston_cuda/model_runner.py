"""CudaModelRunner: the shared torch runner on one GPU.

Inputs are built on the CPU with numpy (the base runner) and reach the GPU through one
pinned staging buffer: ``_to_device`` stages, ``_flush_to_device`` issues one
non-blocking copy of everything staged (inputs and attention metadata before the forward
pass, sampling parameters before sampling). Also here: the profiling forward pass that
measures activation memory, and the warm-up that compiles the attention kernels.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from piston.attention.forward_context import set_forward_context
from piston.attention.metadata import CommonAttentionMetadata
from piston.step.config import EngineConfig
from piston.step.runner_output import ModelRunnerOutput
from piston.step.scheduler_output import SchedulerOutput
from piston.torch_runner.model_runner import TorchModelRunner

from piston_cuda.attention.metadata import CudaAttentionBackend
from piston_cuda.staging import PinnedStaging

logger = logging.getLogger(__name__.replace("piston_cuda", "piston.cuda", 1))


def staging_bytes(max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                  num_groups: int = 1) -> int:
    """Room for one step's staged arrays: per token ids, positions and slots (int64; slots
    and block table rows once per KV cache group); per request the block table row, offsets,
    lengths and sampling parameters; slack for alignment and the attention backend's extras."""
    per_token = (2 + num_groups) * 8
    per_seq = 4 * max_blocks_per_seq * num_groups + 16 * 8 + 64
    return max_num_batched_tokens * per_token + max_num_seqs * per_seq + 64 * 1024


class CudaModelRunner(TorchModelRunner):
    def __init__(self, config: EngineConfig, device: torch.device, attn_impl: CudaAttentionBackend) -> None:
        super().__init__(config, device, attn_impl)
        sc = config.scheduler_config
        max_blocks = -(-self.max_model_len // self.block_size)
        self.staging = PinnedStaging(staging_bytes(sc.max_num_batched_tokens, sc.max_num_seqs, max_blocks,
                                                   self.kv_layout.num_groups), device)
        attn_impl.stage = self._to_device

    def _to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return self.staging.stage(*arrays)

    def _flush_to_device(self) -> None:
        self.staging.flush()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.staging.reset()
        return super().execute_model(scheduler_output)

    def draft_forward(self, scheduled, hidden=None, hidden_index=None):
        self.staging.reset()  # the last pass's copies are done: its tokens came back to the host
        return super().draft_forward(scheduled, hidden, hidden_index)

    # ----- start-up ---------------------------------------------------------------

    @torch.inference_mode()
    def _dummy_decode_forward(self, num_tokens: int) -> None:
        self.staging.reset()  # each capture step stages its inputs from the buffer's start
        super()._dummy_decode_forward(num_tokens)

    @torch.inference_mode()  # with autograd on, the pass would keep every activation for a backward pass
    def profile_run(self) -> None:
        """One forward pass of ``max_num_batched_tokens`` tokens (no KV cache: attention
        treats them as one causal sequence) plus logits and sampling-sized temporaries for
        ``max_num_seqs`` rows, so the allocator's peak covers a real step's activations."""
        n = self.config.scheduler_config.max_num_batched_tokens
        num_seqs = min(self.config.scheduler_config.max_num_seqs, n)
        input_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        positions = torch.arange(n, device=self.device) % max(self.max_model_len, 1)
        hidden = self.model(input_ids, positions)
        logits = self.model.compute_logits(hidden[:num_seqs])
        # Top-p/top-k sampling sorts the logits and keeps a few float32 copies alive.
        probs = torch.softmax(logits, dim=-1)
        torch.sort(probs, dim=-1, descending=True)
        del hidden, logits, probs
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def warm_up_attention(self) -> None:
        """Compile the attention kernels for the decode and prefill shapes before the first
        request (Triton compiles on first launch). Writes K/V only into slots of block 0.."""
        if not self.kv_caches:
            return
        bs = self.block_size
        num_blocks = self.kv_caches[0].shape[1]
        for query_lens in ([1, 1], [min(2 * bs, self.max_model_len, num_blocks * bs)]):
            self._dummy_attention_step(np.array(query_lens, dtype=np.int64))
        torch.cuda.synchronize(self.device)

    def _dummy_attention_step(self, query_lens: np.ndarray) -> None:
        bs = self.block_size
        num_blocks = self.kv_caches[0].shape[1]
        seq_lens = query_lens.astype(np.int32)
        total = int(query_lens.sum())
        blocks_per_seq = -(-seq_lens // bs)
        max_blocks = int(blocks_per_seq.max())
        table = (np.arange(len(seq_lens) * max_blocks, dtype=np.int32) % num_blocks).reshape(len(seq_lens), -1)
        qsl = np.zeros(len(seq_lens) + 1, dtype=np.int32)
        qsl[1:] = np.cumsum(query_lens)
        req = np.repeat(np.arange(len(seq_lens)), query_lens)
        pos = np.arange(total) - qsl[:-1][req]
        slots = table[req, pos // bs].astype(np.int64) * bs + pos % bs
        self.staging.reset()
        qsl_t, lens_t, table_t, slots_t, ids_t, pos_t = self._to_device(
            qsl, seq_lens, table, slots, np.zeros(total, dtype=np.int64), pos.astype(np.int64))
        common = CommonAttentionMetadata(
            num_reqs=len(seq_lens), num_actual_tokens=total, max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()), query_start_loc_np=qsl, seq_lens_np=seq_lens,
            query_start_loc=qsl_t, seq_lens=lens_t, block_table=table_t, slot_mapping=slots_t,
            block_size=bs)
        ctx = self._forward_context([self.attn_impl.build_metadata(common)] * self.kv_layout.num_groups,
                                    self.kv_caches, {})
        self._flush_to_device()
        with set_forward_context(ctx):
            self.model(ids_t, pos_t)

"""CpuWorker: runs the shared torch model runner on the host CPU."""

from __future__ import annotations

import ctypes
import logging
import os

import torch
from piston.hal.interface import Worker
from piston.step.tp_layout import num_kv_head_copies
from piston.step.worker_messages import KVCacheReport
from piston.torch_runner.model_runner import TorchModelRunner

from piston_cpu import decoder_stack, greedy_head, kernels, layer_kernels, packed_weights
from piston_cpu.attention import CpuAttention

logger = logging.getLogger(__name__.replace("piston_cpu", "piston.cpu", 1))


class CpuWorker(Worker):
    def __init__(self, config, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(config, rank, world_size)
        # Tensor-parallel ranks share the host's cores.
        threads = int(os.environ.get("PISTON_CPU_THREADS", "0")) or max(1, (os.cpu_count() or 1) // world_size)
        torch.set_num_threads(threads)
        # Piston's C++ kernels are float32 code: other dtypes run torch's kernels.
        self.kernels = kernels.load() if config.model_config.dtype == "float32" else None
        self.runner = TorchModelRunner(config, torch.device("cpu"), CpuAttention(self.kernels))
        self.kernel_layers = 0
        self.decoder_stack = None
        # Packed copies of the float32 linear weights for the packed GEMM (packed_weights.py).
        self.packed_weights = None if self.kernels is None else packed_weights.PackedWeights(self.kernels)
        # Greedy steps' tokens from an int8 copy of the LM head (greedy_head.py).
        self.greedy_heads = greedy_head.GreedyHeads(self.kernels)
        self.num_blocks = 0

    def load_model(self) -> None:
        self.runner.load_model()
        if self.kernels is not None:
            self.runner.sampler.argmax = layer_kernels.make_argmax(self.kernels)
        if self.kernels is not None and self.runner.draft_model is not None:
            layer_kernels.install(self.runner.draft_model, self.kernels, self.packed_weights)
        if self.kernels is not None and self.config.lora_config is not None:
            layer_kernels.install_lora(self.kernels)
            logger.info("CPU kernels: LoRA layers through the C++ SGMV kernel (every adapter of a step in one call).")
        if self.kernels is not None and self.runner.compiled is None:
            self.kernel_layers = layer_kernels.install(self.runner.model, self.kernels, self.packed_weights)
        if self.packed_weights is not None:
            self.packed_weights.pack()
        for model in (self.runner.model, self.runner.draft_model):
            if model is not None:
                self.greedy_heads.install(model)
        self.greedy_heads.prepare()
        if self.kernels is not None and self.runner.compiled is None:
            if self.packed_weights.packed_count():
                linear = f"linear by the packed GEMM up to {packed_weights.MAX_ROWS} rows"
            else:
                wide = layer_kernels.torch_gemm_is_wide()
                linear = (f"linear up to {layer_kernels.kernel_rows(layer_kernels.LONG_K, wide)} rows, "
                          f"{layer_kernels.kernel_rows(layer_kernels.LONG_K + 1, wide)} past "
                          f"{layer_kernels.LONG_K} inputs")
            logger.info("CPU kernels: paged attention, and %d layers (%s, then torch's GEMM, %s; RMSNorm, RoPE, "
                        "SiLU-and-mul).", self.kernel_layers, linear, torch.backends.cpu.get_cpu_capability())
            self._install_decoder_stack()
            if self.decoder_stack is not None:
                logger.info("CPU kernels: the decoder layers run as one C++ call on steps of up to %d tokens.",
                            decoder_stack.MAX_STACK_ROWS)
            if layer_kernels.int8_activations():
                logger.info("PISTON_CPU_QUANT_ACTIVATIONS=int8: packed layers quantize up to 8 rows of "
                            "activations to int8 per 32 values (the 32-value GGUF formats).")

    def _install_decoder_stack(self) -> None:
        """(Re)builds the decoder stack, which holds the weights' tensors: after a reload
        or a wake-up the model may hold new ones (packed segments, the RoPE table)."""
        if self.kernels is None or self.runner.compiled is not None:
            return
        self.decoder_stack = decoder_stack.install(self.kernels, self.runner.model)
        if self.runner.draft_model is not None:
            decoder_stack.install(self.kernels, self.runner.draft_model)

    def kernel_info(self) -> dict:
        """Which kernels run (for collective_rpc): the attention backend's name, how many
        layers use Piston's C++ kernels (0: torch's ops), whether the decoder layers run
        as one C++ call (piston_cpu.decoder_stack) and on how many steps they did, and how
        many float32 weights have a packed copy for the packed GEMM (packed_weights), and what
        the greedy LM head served (greedy_head.GreedyHeads.stats)."""
        stack, packed = self.decoder_stack, self.packed_weights
        return {"attention": self.runner.attn_impl.name, "layers": self.kernel_layers,
                "decoder_stack": stack is not None, "decoder_stack_steps": 0 if stack is None else stack.steps,
                "packed_weights": 0 if packed is None else packed.packed_count(),
                "greedy_head": self.greedy_heads.stats()}

    def determine_num_kv_blocks(self) -> KVCacheReport:
        # kv_cache_memory is the whole host's budget: each rank takes the share of its KV
        # heads, so TP keeps the total memory (and, unless heads are replicated, the blocks).
        total_kv = self.config.model_config.num_kv_heads
        budget = (self.config.cache_config.kv_cache_memory * self.runner.num_kv_heads
                  // num_kv_head_copies(total_kv, self.world_size))
        return self.kv_blocks_in(budget, self.runner.kv_cache_bytes_per_block(), self.runner.block_size)

    def initialize_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.runner.initialize_kv_cache(num_blocks)
        if self.config.cache_config.kv_offloading:
            self.runner.enable_kv_offload(self.rank)

    def apply_kv_transfer(self, transfer: list) -> None:
        self.runner.apply_kv_transfer(transfer)

    def clear_kv_offload(self) -> None:
        self.runner.clear_kv_offload()

    def execute_model(self, scheduler_output):
        return self.runner.execute_model(scheduler_output)

    def sleep(self, level: int = 1) -> None:
        # Host memory is this device's memory: level 1 keeps the weights in a temporary
        # file (the OS page cache, outside the resident set) so that sleep gives RAM back.
        self.runner.kv_caches = []
        if self.packed_weights is not None:  # packed again from the weights on waking
            self.packed_weights.release()
        self.greedy_heads.release()
        freed = self.runner.release_weights("file" if level == 1 else None)
        _return_free_memory()
        logger.info("Asleep (level %d): released the KV cache and %.2f GB of weights%s.", level, freed / 1e9,
                    " (kept in a temporary file)" if level == 1 else "")

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = ["weights", "kv_cache"] if tags is None else tags
        if "weights" in tags:
            self.runner.restore_weights()
            self._repack()
        if "kv_cache" in tags and not self.runner.kv_caches:
            self.runner.initialize_kv_cache(self.num_blocks)

    def update_weights(self, weights: list) -> int:
        applied = self.runner.update_weights(weights)  # in place: the stack's tensors stay current
        if self.packed_weights is not None:
            self.packed_weights.pack()  # in place as well
        self.greedy_heads.prepare()
        return applied

    def reload_weights(self) -> None:
        self.runner.reload_weights()
        self._repack()

    def _repack(self) -> None:
        """After the weights came back or were reloaded: their packed copies, then the stack."""
        if self.packed_weights is not None:
            self.packed_weights.pack()
        self.greedy_heads.prepare()
        self._install_decoder_stack()

    def shutdown(self) -> None:
        self.runner.close_kv_offload()


def _return_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim): weights smaller than
    malloc's mmap threshold live in the heap, and freeing them alone leaves them resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

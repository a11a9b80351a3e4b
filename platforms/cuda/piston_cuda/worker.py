"""CudaWorker: the shared torch runner on one GPU, with the KV cache sized from memory.

KV-cache size: an explicit ``--kv-cache-memory`` wins. Otherwise, after the weights are
loaded, a profiling forward pass of ``max_num_batched_tokens`` tokens measures the
activation peak, and the cache gets what is left of ``gpu_memory_utilization`` of the
device: ``total * utilization - (memory in use now) - (activation peak)``. Memory in use
counts the weights, the CUDA context and anything other processes hold on the GPU.

CUDA graphs take memory of their own (a private pool: the pieces' outputs and
temporaries for the largest capture size, held for as long as the graphs live). So that
the cache does not take it too, the graphs are captured before the cache is sized, over a
scratch cache of ``SCRATCH_BLOCKS`` blocks: the captured pieces never read the KV cache
(attention runs eagerly between them), so they stay valid when the real cache replaces
the scratch one.
"""

from __future__ import annotations

import logging

import torch
from piston.distributed.parallel_state import get_tp_rank, get_tp_size
from piston.hal.interface import Worker
from piston.step.worker_messages import KVCacheReport

from piston_cuda.attention.selector import make_attention_backend
from piston_cuda.cuda_graph import CudaGraphStrategy
from piston_cuda.model_runner import CudaModelRunner

logger = logging.getLogger(__name__.replace("piston_cuda", "piston.cuda", 1))

GiB = 2**30
SCRATCH_BLOCKS = 2  # the warm-up and capture passes write into block 0 (and read block 1)


def kv_cache_budget(total: int, free: int, activation_peak: int, utilization: float) -> int:
    """Bytes the KV cache may take: the fraction of the device not in use and not needed
    for activations (negative when the weights and activations alone exceed it)."""
    return int(total * utilization) - (total - free) - activation_peak


class CudaWorker(Worker):
    def __init__(self, config, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(config, rank, world_size)
        self.device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(self.device)
        mc = config.model_config
        heads = mc.heads_of_rank(get_tp_size(), get_tp_rank())
        attn = make_attention_backend(getattr(torch, mc.dtype), config.cache_config.block_size,
                                      heads.num_heads, heads.num_kv_heads, mc.head_dim, self.device,
                                      use_cascade=not mc.disable_cascade_attn,
                                      kv_dtype=getattr(torch, config.kv_cache_dtype))
        self.runner = CudaModelRunner(config, self.device, attn)
        # Piecewise CUDA graphs around the attention op; compiled by default on CUDA.
        self.runner.capture_strategy = CudaGraphStrategy.from_config(config, self.device)
        self.runner.default_compilation_mode = "piecewise"
        self.num_blocks = 0
        self.recapture = False  # weights restored while the KV cache slept: capture at its wake-up
        self.graphs_captured = False
        self.graph_bytes = 0  # device memory the captured graphs hold

    def load_model(self) -> None:
        self.runner.load_model()
        if self.runner.compiled is None:
            # Packed weights through the Triton dequant-GEMM when the model runs eagerly; the
            # compiled (piecewise graph) path keeps the layers' torch fallback, which Dynamo traces.
            from piston_cuda.kernels.dequant_matmul import install_qkernels

            if count := install_qkernels(self.runner.model):
                logger.info("Packed weights: %d layers through the Triton dequant-GEMM.", count)
        if self.config.lora_config is not None:  # the Triton SGMV shrink/expand pair for every LoRA layer
            from piston.models.layers.lora import LoRAStack
            from piston_cuda.kernels.lora import lora_shrink_expand

            LoRAStack.kernel = staticmethod(lambda stack, x, y, m: lora_shrink_expand(
                x, y, stack.lora_a, stack.lora_b, m.token_ids, m.slot_ends, m.max_tokens_per_slot))
        from piston.models.layers.fused_moe import FusedMoE

        if any(isinstance(m, FusedMoE) for m in self.runner.model.modules()):
            # The Triton grouped GEMMs for every MoE layer: an opaque op, so compiled pieces and
            # CUDA graphs take it as it is (it reads nothing back to the host).
            from piston_cuda.kernels.fused_moe import fused_moe

            FusedMoE.kernel = staticmethod(fused_moe)
        logger.info("Weights on %s: %.2f GiB allocated.", torch.cuda.get_device_name(self.device),
                    torch.cuda.memory_allocated(self.device) / GiB)

    def determine_num_kv_blocks(self) -> KVCacheReport:
        cc = self.config.cache_config
        per_block = self.runner.kv_cache_bytes_per_block()
        if cc.kv_cache_memory is not None:
            budget, source = cc.kv_cache_memory, f"kv_cache_memory={cc.kv_cache_memory}"
        else:
            budget = self._profile_budget(cc.gpu_memory_utilization)
            source = f"gpu_memory_utilization={cc.gpu_memory_utilization}"
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(
                f"{source} leaves {max(budget, 0) / GiB:.2f} GiB for the KV cache, less than one block "
                f"({per_block} bytes for {self.runner.block_size} tokens of this model). Raise "
                f"--gpu-memory-utilization or --kv-cache-memory, or lower --max-num-batched-tokens.")
        return KVCacheReport(int(num_blocks), per_block)

    def _profile_budget(self, utilization: float) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.runner.profile_run()
        activation_peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        self._capture_graphs(scratch_cache=True)  # their memory is in use from here on
        free, total = torch.cuda.mem_get_info(self.device)
        budget = kv_cache_budget(total, free, activation_peak, utilization)
        logger.info("Memory profile: %.2f GiB total, %.2f GiB in use (%.2f GiB of it CUDA graphs), %.2f GiB "
                    "activation peak; KV cache gets %.2f GiB (gpu_memory_utilization=%.2f).", total / GiB,
                    (total - free) / GiB, self.graph_bytes / GiB, activation_peak / GiB, max(budget, 0) / GiB,
                    utilization)
        return budget

    def _capture_graphs(self, scratch_cache: bool = False) -> None:
        """Capture the CUDA graphs once (a no-op when the model runs eagerly) and record the
        device memory they took. ``scratch_cache``: over a cache of ``SCRATCH_BLOCKS`` blocks,
        freed afterwards (before the real cache is sized)."""
        runner = self.runner
        if self.graphs_captured or runner.compiled is None or not runner.compiled.strategy.captures_graphs:
            return
        if scratch_cache:
            runner.initialize_kv_cache(SCRATCH_BLOCKS)
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        runner.warm_up_attention()
        runner.capture_model()
        torch.cuda.synchronize(self.device)
        self.graph_bytes = max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)
        if scratch_cache:
            runner.kv_caches = []
            torch.cuda.empty_cache()
        self.graphs_captured = True
        logger.info("CUDA graphs hold %.3f GiB of device memory.", self.graph_bytes / GiB)

    def initialize_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.runner.initialize_kv_cache(num_blocks)
        if self.config.cache_config.kv_offloading:
            self.runner.enable_kv_offload(self.rank)

    def apply_kv_transfer(self, transfer: list) -> None:
        self.runner.apply_kv_transfer(transfer)

    def clear_kv_offload(self) -> None:
        self.runner.clear_kv_offload()

    def _drop_graphs(self) -> None:
        if self.runner.compiled is not None:
            self.runner.compiled.strategy.drop_graphs()
        self.graphs_captured = False

    def warm_up(self) -> None:
        self.runner.warm_up_attention()
        self._capture_graphs()  # already done when the cache was sized from memory

    def execute_model(self, scheduler_output):
        return self.runner.execute_model(scheduler_output)

    def sleep(self, level: int = 1) -> None:
        # Unverified without a GPU: the weights go to pinned host memory (level 1) or away
        # (level 2), and the caching allocator returns the freed blocks to the driver.
        self.runner.kv_caches = []
        freed = self.runner.release_weights("host" if level == 1 else None)
        torch.cuda.empty_cache()
        logger.info("Asleep (level %d): released the KV cache and %.2f GB of weights.", level, freed / 1e9)

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = ["weights", "kv_cache"] if tags is None else tags
        if "weights" in tags and self.runner.weight_memory is not None and self.runner.weight_memory.released:
            self.runner.restore_weights()
            # The weights have new addresses: graphs captured over the old ones are stale.
            self._drop_graphs()
            if self.runner.kv_caches:
                self._capture_graphs()
            else:
                self.recapture = True
        if "kv_cache" in tags and not self.runner.kv_caches:
            self.runner.initialize_kv_cache(self.num_blocks)
            if self.recapture:
                self.recapture = False
                self._capture_graphs()

    def update_weights(self, weights: list) -> int:
        return self.runner.update_weights(weights)  # in place: captured graphs stay valid

    def reload_weights(self) -> None:
        self.runner.reload_weights()

    def shutdown(self) -> None:
        self.runner.close_kv_offload()
        self.runner.kv_caches = []
        self.runner.model = None
        torch.cuda.empty_cache()

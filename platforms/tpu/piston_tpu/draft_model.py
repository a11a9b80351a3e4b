"""DraftModel: speculative decoding's draft model on the TPU platform.

The draft's weights, rotary tables, KV cache (its own layers, in the target's block ids) and
compiled programs: ``forward`` per token bucket and ``draft_tokens`` (greedy tokens of the
sampled rows) per request bucket. The JaxModelRunner owns one when
``SpeculativeConfig.method`` is "draft_model" and calls ``run`` with the StepInputs of each
pass that piston.step.draft_proposer lays out. An EAGLE-1 head (``eagle``) has its own
programs (piston_tpu.programs) and reads the target's embedding, head and hidden states.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from piston.step.config import ModelConfig

from piston_tpu import buckets
from piston_tpu.attention import make_attention
from piston_tpu.kv_cache import kv_cache_shape
from piston_tpu.model import LlamaSpec, rope_arrays
from piston_tpu.programs import ModelPrograms
from piston_tpu.step_inputs import StepInputs

logger = logging.getLogger(__name__.replace("piston_tpu", "piston.tpu", 1))


class DraftModel:
    def __init__(self, config: ModelConfig, dtype: np.dtype, max_model_len: int, eagle: bool = False,
                 eagle3: bool = False) -> None:
        self.config = config
        self.eagle = eagle or eagle3
        self.eagle3 = eagle3
        self.last: jax.Array | None = None  # an EAGLE head's outputs of its last pass [max_seqs, hidden]
        self.dtype = dtype
        self.max_model_len = max_model_len
        # An EAGLE head's layers are Llama layers, whatever architecture its config names.
        self.spec = LlamaSpec.from_model_config(config, "LlamaForCausalLM" if self.eagle else None)
        self.params: dict[str, jax.Array] = {}
        self.host_params: dict[str, np.ndarray] | None = None
        self.rope: tuple[jax.Array, jax.Array] | None = None
        self.rotary_dim = 0
        self.kv_cache: jax.Array | None = None
        self.programs: ModelPrograms | None = None

    def load(self) -> None:
        from piston_tpu.weights import load_eagle3_params, load_eagle_params, load_params

        start = time.perf_counter()
        load = load_eagle3_params if self.eagle3 else load_eagle_params if self.eagle else load_params
        self.params = {n: jnp.asarray(a) for n, a in load(self.spec, self.config, self.dtype).items()}
        self.rope, self.rotary_dim = rope_arrays(self.spec, self.config.hf_config, self.max_model_len)
        logger.info("Loaded the %s %s (%s) in %.2f s: %.1fM parameters.", "EAGLE head" if self.eagle else "draft model",
                    self.config.path or self.config.model, self.spec.architecture, time.perf_counter() - start,
                    sum(int(np.prod(p.shape)) for p in self.params.values()) / 1e6)

    def kv_bytes_per_block(self, block_size: int, kv_cache_dtype: str) -> int:
        return self.config.kv_bytes_per_block(block_size, kv_cache_dtype=kv_cache_dtype)

    def initialize_kv_cache(self, num_blocks: int, block_size: int, kv_dtype: np.dtype) -> None:
        s = self.spec
        self.kv_cache = jnp.zeros(kv_cache_shape(s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim),
                                  kv_dtype)

    def release_weights(self, keep_host: bool) -> int:
        nbytes = sum(int(p.nbytes) for p in self.params.values())
        self.host_params = {n: np.array(jax.device_get(p)) for n, p in self.params.items()} if keep_host else None
        for p in self.params.values():
            p.delete()
        self.params = {}
        return nbytes

    def restore_weights(self) -> None:
        if self.params:
            return
        if self.host_params is None:
            self.load()
            return
        self.params = {n: jnp.asarray(a) for n, a in self.host_params.items()}
        self.host_params = None

    def warm_up(self, attention_name: str, on_tpu: bool, block_size: int, precision, token_buckets: list[int],
                request_buckets: list[int], max_seqs: int, pages_per_seq: int) -> None:
        if self.programs is not None:
            return
        attention = make_attention(attention_name, self.spec.query_scale, on_tpu, block_size, precision)
        self.programs = ModelPrograms(self.spec, attention, self.rotary_dim, token_buckets, request_buckets,
                                      max_seqs, pages_per_seq, precision, draft=True, eagle=self.eagle,
                                      eagle3=self.eagle3, norm_before_residual=bool(
                                          getattr(self.config.hf_config, "norm_before_residual", False)))
        self.programs.compile_all(self.params, self.rope, self.kv_cache)

    def run(self, step: StepInputs, logits_indices: np.ndarray, max_seqs: int) -> np.ndarray:
        """One pass over ``step`` (one KV cache group's metadata: the runner's group 0): the
        draft's greedy token at each of ``logits_indices``."""
        n = len(logits_indices)
        sample_idx = np.zeros(max_seqs, np.int32)
        sample_idx[:n] = logits_indices
        _, hidden_sampled, self.kv_cache = self.programs(
            "forward", step.bucket, self.params, self.rope, self.kv_cache, step.input_ids, step.positions,
            step.metadata, sample_idx)
        if n == 0:
            return np.zeros(0, np.int64)
        r = buckets.pick_bucket(self.programs.request_buckets, n)
        head = self.params.get("lm_head", self.params["embed"])
        return np.asarray(self.programs("draft_tokens", r, head, hidden_sampled))[:n].astype(np.int64)

    def run_eagle(self, step: StepInputs, logits_indices: np.ndarray, max_seqs: int, target_hidden: jax.Array | None,
                  hidden_index: np.ndarray, embed: jax.Array, head: jax.Array) -> np.ndarray:
        """One EAGLE pass over ``step`` (its ids are the tokens after each position): the
        features are rows ``hidden_index`` of the target's hidden states of the step
        (``target_hidden``, of the step's bucket; an EAGLE-3 head's: its aux layers' inputs)
        or, when None, of the head's last outputs."""
        n = len(logits_indices)
        idx = np.zeros(step.bucket, np.int32)
        idx[:len(hidden_index)] = hidden_index
        if target_hidden is not None and self.eagle3:
            features = self.programs("gather_target", step.bucket, target_hidden, idx, self.params["fc"])
        elif target_hidden is not None:
            features = self.programs("gather_target", step.bucket, target_hidden, idx)
        else:
            features = self.programs("gather_last", step.bucket, self.last, idx)
        sample_idx = np.zeros(max_seqs, np.int32)
        sample_idx[:n] = logits_indices
        self.last, self.kv_cache = self.programs(
            "eagle_forward", step.bucket, self.params, self.rope, self.kv_cache, step.input_ids, step.positions,
            step.metadata, features, sample_idx, self.params.get("embed", embed))
        if n == 0:
            return np.zeros(0, np.int64)
        r = buckets.pick_bucket(self.programs.request_buckets, n)
        if self.eagle3:  # its own head over its draft vocabulary
            head = {name: self.params[name] for name in ("norm", "lm_head", "d2t")}
        return np.asarray(self.programs("draft_tokens", r, head, self.last))[:n].astype(np.int64)

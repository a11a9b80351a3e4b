"""Multi-LoRA on the TPU platform's JAX model runner, in process, on a tiny random Llama.

The reference needs no torch: an adapter's greedy tokens must be those of the base model
with the adapter merged into its weights (W + scaling * B @ A), run by the same runner
(same compiled programs) without an adapter. Rows of two adapters and the base model in
one step must each give their own reference tokens, and no step compiles anything (the
runner's RecompileDetector raises otherwise), loading adapters into slots included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
import jax.numpy as jnp  # noqa: E402
from piston.step.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig  # noqa: E402
from piston.step.lora_request import LoRARequest  # noqa: E402
from piston.step.sampling_params import SamplingParams  # noqa: E402
from piston.step.scheduler_output import NewRequestData, RunningRequestData, SchedulerOutput  # noqa: E402
from piston_tpu import lora  # noqa: E402
from piston_tpu.model_runner import JaxModelRunner  # noqa: E402

BLOCK = 16
PROMPTS = [[5, 17, 3, 99, 42, 8, 61, 23, 77, 2], [31, 64, 90, 11, 7, 50], [88, 4, 36, 120, 9, 14, 70, 101, 3]]
DECODE = 5
LAYERS, HIDDEN, INTER, HEADS, KV_HEADS = 2, 32, 64, 4, 2
HEAD_DIM = HIDDEN // HEADS
FEATURES = {"q_proj": (HIDDEN, HEADS * HEAD_DIM), "k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
            "v_proj": (HIDDEN, KV_HEADS * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, HIDDEN),
            "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
# Where each module's rows sit in the runner's fused weights.
FUSED = {"q_proj": ("qkv", 0), "k_proj": ("qkv", HEADS * HEAD_DIM), "v_proj": ("qkv", (HEADS + KV_HEADS) * HEAD_DIM),
         "o_proj": ("o", 0), "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", INTER), "down_proj": ("down", 0)}


def _write_adapter(folder, seed: int, r: int, alpha: float, modules: list[str]) -> dict:
    """A PEFT adapter folder with random A and B; returns {(layer, module): scaled B @ A}."""
    rng = np.random.default_rng(seed)
    tensors, merged = {}, {}
    for layer in range(LAYERS):
        for module in modules:
            n_in, n_out = FEATURES[module]
            a = rng.normal(0, 0.3, (r, n_in)).astype(np.float32)
            b = rng.normal(0, 0.3, (n_out, r)).astype(np.float32)
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            merged[(layer, module)] = (alpha / r) * (b.astype(np.float64) @ a.astype(np.float64))
    folder.mkdir()
    safetensors_numpy.save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": modules, "bias": "none"}))
    return merged


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(runner, its base weights as numpy, {name: (LoRARequest, merged deltas)})."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PISTON_TPU_ATTENTION", "xla")
        mp.setenv("PISTON_TPU_COMPILATION_CACHE", "0")
        hf = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                                      architectures=["LlamaForCausalLM"])
        config = EngineConfig(ModelConfig(model="tiny", load_format="dummy", max_model_len=64, hf_config=hf),
                              CacheConfig(block_size=BLOCK),
                              SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4),
                              lora_config=LoRAConfig(max_loras=2, max_lora_rank=8))
        runner = JaxModelRunner(config, on_tpu=False)
        runner.load_model()
        rng = np.random.default_rng(0)  # wide logits, so greedy tokens have no near-ties
        for k, v in list(runner.params.items()):
            if "norm" not in k and not lora.is_lora_param(k):
                runner.params[k] = jnp.asarray(rng.normal(0, 0.3, v.shape).astype(np.float32))
        runner.initialize_kv_cache(16)
        runner.warm_up()
    base = {k: np.array(v) for k, v in runner.params.items() if not lora.is_lora_param(k)}
    tmp = tmp_path_factory.mktemp("adapters")
    adapters = {
        # every module at rank 4; rank 8 on three modules only (the others stay the base's)
        "a1": (LoRARequest("a1", 1, str(tmp / "a1")), _write_adapter(tmp / "a1", 1, 4, 8.0, list(FEATURES))),
        "a2": (LoRARequest("a2", 2, str(tmp / "a2")),
               _write_adapter(tmp / "a2", 2, 8, 4.0, ["q_proj", "v_proj", "down_proj"])),
    }
    return runner, base, adapters


def _step(new=(), cached=(), num=None, finished=()) -> SchedulerOutput:
    cached = list(cached)
    data = RunningRequestData([c[0] for c in cached], [[c[1]] for c in cached], [c[2] for c in cached])
    return SchedulerOutput(list(new), data, dict(num or {}), sum((num or {}).values()), list(finished))


def _generate(runner: JaxModelRunner, reqs: list[tuple[str, int, LoRARequest | None]]) -> dict[str, list[int]]:
    """Prefill ``reqs`` (id, prompt index, adapter) in one step, then decode them together."""
    new = [NewRequestData(req_id, PROMPTS[p], [], SamplingParams(temperature=0.0, max_tokens=DECODE + 1),
                          [[2 * i, 2 * i + 1]], 0, None, lr) for i, (req_id, p, lr) in enumerate(reqs)]
    done = {req_id: len(PROMPTS[p]) for req_id, p, _ in reqs}
    try:
        out = runner.execute_model(_step(new=new, num=dict(done)))
        tokens = {r: list(ids) for r, ids in zip(out.req_ids, out.sampled_token_ids)}
        for _ in range(DECODE):
            out = runner.execute_model(_step(cached=[(r, [], n) for r, n in done.items()],
                                             num={r: 1 for r in done}))
            for r, ids in zip(out.req_ids, out.sampled_token_ids):
                tokens[r] += ids
                done[r] += 1
    finally:
        runner.execute_model(_step(finished=list(done)))
    return tokens


def _set_base(runner: JaxModelRunner, base: dict, merged: dict | None = None) -> None:
    """The runner's weights: ``base``, with ``merged`` deltas added to their modules."""
    params = {k: v.copy() for k, v in base.items()}
    for (layer, module), d in (merged or {}).items():
        name, row = FUSED[module]
        params[name][layer, row:row + d.shape[0]] += d.astype(np.float32)
    runner.params.update({k: jnp.asarray(v) for k, v in params.items()})


def _references(runner, base, adapters) -> dict[tuple[str | None, int], list[int]]:
    """Greedy tokens of each (adapter, prompt) from merged weights, no adapter."""
    refs = {}
    for name in (None, *adapters):
        _set_base(runner, base, adapters[name][1] if name else None)
        got = _generate(runner, [(f"ref-{name}-{p}", p, None) for p in range(len(PROMPTS))])
        refs.update({(name, p): got[f"ref-{name}-{p}"] for p in range(len(PROMPTS))})
    _set_base(runner, base)
    return refs


def test_adapters_and_a_mixed_batch_match_merged_weights(setup):
    runner, base, adapters = setup
    refs = _references(runner, base, adapters)
    for p in range(len(PROMPTS)):  # the adapters change the greedy tokens
        assert refs[("a1", p)] != refs[(None, p)] and refs[("a2", p)] != refs[(None, p)]
    compiled = runner.detector.num_compiles
    for name in (None, *adapters):  # each adapter alone (all prompts in one step)
        lr = adapters[name][0] if name else None
        got = _generate(runner, [(f"{name}-{p}", p, lr) for p in range(len(PROMPTS))])
        assert [got[f"{name}-{p}"] for p in range(len(PROMPTS))] == [refs[(name, p)] for p in range(len(PROMPTS))]
    # One step mixing both adapters and the base model, across prompts.
    rows = [("m0", 0, "a1"), ("m1", 1, None), ("m2", 2, "a2"), ("m3", 1, "a1")]
    got = _generate(runner, [(r, p, adapters[n][0] if n else None) for r, p, n in rows])
    assert {r: got[r] for r, _, _ in rows} == {r: refs[(n, p)] for r, p, n in rows}
    assert runner.detector.num_compiles == compiled  # slot writes included


def test_slots_survive_a_level_1_sleep_and_are_forgotten_by_a_reload(setup):
    runner, base, adapters = setup
    _set_base(runner, base)
    lr = adapters["a1"][0]
    before = _generate(runner, [("s0", 0, lr)])["s0"]
    slots = list(runner.lora.slot_ids)
    assert lr in slots
    runner.release_weights(keep_host=True)
    runner.restore_weights()
    assert runner.lora.slot_ids == slots
    assert _generate(runner, [("s1", 0, lr)])["s1"] == before
    runner.release_weights(keep_host=False)
    runner.restore_weights()  # reloads (dummy) weights: the slots come back empty
    assert runner.lora.slot_ids == [None, None]
    assert all(not np.asarray(runner.params[n]).any() for n in lora.PARAM_NAMES)
    _set_base(runner, base)
    assert _generate(runner, [("s2", 0, lr)])["s2"] == before  # written again when used
    assert lr in runner.lora.slot_ids

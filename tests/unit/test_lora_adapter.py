"""The PEFT LoRA adapter reader (piston.step.lora_adapter) and the adapter cache and device slots
(piston.step.lora_slots), on small synthetic adapters written with numpy and safetensors (no
torch, no peft): what is read, how it is scaled, and every refusal naming its cause."""

from __future__ import annotations

import json
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from piston.step import lora_slots as lora_slots_module
from piston.step.config import LoRAConfig
from piston.step.lora_adapter import LoRAAdapterError, LoRAModelDims, load_adapter
from piston.step.lora_request import LoRARequest
from piston.step.lora_slots import LoRASlots

HIDDEN, Q, KV, INTER = 16, 16, 8, 24
DIMS = LoRAModelDims(2, {"q_proj": (HIDDEN, Q), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV),
                         "o_proj": (Q, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
                         "down_proj": (INTER, HIDDEN)})
MAX_RANK = 16


def _key(layer: int, module: str, which: str, prefix: str = "base_model.model.model.") -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"{prefix}layers.{layer}.{block}.{module}.lora_{which}.weight"


def make_tensors(r: int = 4, modules=("q_proj", "v_proj"), layers=(0, 1), seed: int = 0,
                 ranks: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """PEFT-named lora_A [r, in] / lora_B [out, r] float32 tensors (``ranks``: per-module r)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for module in modules:
            rank = (ranks or {}).get(module, r)
            in_f, out_f = DIMS.features[module]
            tensors[_key(layer, module, "A")] = rng.standard_normal((rank, in_f)).astype(np.float32)
            tensors[_key(layer, module, "B")] = rng.standard_normal((out_f, rank)).astype(np.float32)
    return tensors


def write_adapter(folder, tensors: dict[str, np.ndarray] | None = None, **config) -> dict[str, np.ndarray]:
    """A PEFT adapter folder: adapter_config.json (r=4, lora_alpha=8 unless given) and
    adapter_model.safetensors. Returns the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = make_tensors(r=config.get("r", 4)) if tensors is None else tensors
    full = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none",
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
            "rank_pattern": {}, "alpha_pattern": {}, **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors


def write_raw_safetensors(path, entries: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file by hand (for dtypes numpy lacks): {name: (dtype, shape, raw bytes)}."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(raw for _, _, raw in entries.values()))


def load(folder, name: str = "ad", lora_id: int = 1, max_rank: int = MAX_RANK):
    return load_adapter(LoRARequest(name, lora_id, str(folder)), DIMS, max_rank)


# ----- reading and scaling ----------------------------------------------------------------


def test_reads_peft_layout_and_folds_alpha_over_r_into_b(tmp_path):
    tensors = write_adapter(tmp_path / "a", r=4, lora_alpha=8)
    adapter = load(tmp_path / "a", lora_id=7)
    assert adapter.lora_int_id == 7 and adapter.rank == 4
    assert set(adapter.weights) == {(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")}
    assert adapter.modules() == {"q_proj", "v_proj"}
    for (layer, module), (a, b) in adapter.weights.items():
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, tensors[_key(layer, module, "A")])
        np.testing.assert_allclose(b, tensors[_key(layer, module, "B")] * 2.0, rtol=1e-7)  # 8 / 4
    assert adapter.nbytes == sum(t.nbytes for t in tensors.values())


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    tensors = write_adapter(tmp_path / "a", r=4, lora_alpha=6, use_rslora=True)
    adapter = load(tmp_path / "a")
    _, b = adapter.weights[(1, "v_proj")]
    np.testing.assert_allclose(b, tensors[_key(1, "v_proj", "B")] * 3.0, rtol=1e-6)  # 6 / sqrt(4)


def test_rank_pattern_and_alpha_pattern_per_module(tmp_path):
    tensors = make_tensors(r=4, modules=("q_proj", "v_proj", "down_proj"), ranks={"v_proj": 8})
    write_adapter(tmp_path / "a", tensors, r=4, lora_alpha=8, rank_pattern={"v_proj": 8},
                  alpha_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 1})
    adapter = load(tmp_path / "a")
    assert adapter.rank == 8  # the largest of any module
    expected = {(0, "q_proj"): 8 / 4, (1, "q_proj"): 2 / 4, (0, "v_proj"): 8 / 8, (1, "v_proj"): 8 / 8,
                (0, "down_proj"): 1 / 4, (1, "down_proj"): 1 / 4}
    for (layer, module), scaling in expected.items():
        a, b = adapter.weights[(layer, module)]
        assert a.shape[0] == (8 if module == "v_proj" else 4)
        np.testing.assert_allclose(b, tensors[_key(layer, module, "B")] * scaling, rtol=1e-6,
                                   err_msg=f"layer {layer} {module}")


def test_rank_pattern_with_rslora(tmp_path):
    tensors = make_tensors(r=4, modules=("q_proj", "k_proj"), ranks={"k_proj": 16})
    write_adapter(tmp_path / "a", tensors, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj": 16})
    adapter = load(tmp_path / "a")
    np.testing.assert_allclose(adapter.weights[(0, "q_proj")][1], tensors[_key(0, "q_proj", "B")] * 8 / 2, rtol=1e-6)
    np.testing.assert_allclose(adapter.weights[(0, "k_proj")][1], tensors[_key(0, "k_proj", "B")] * 8 / 4, rtol=1e-6)


@pytest.mark.parametrize("prefix", ["", "model.", "base_model.model.model."])
@pytest.mark.parametrize("adapter_name", ["", ".default", ".my-adapter"])
def test_tensor_names_with_and_without_prefixes_and_adapter_names(tmp_path, prefix, adapter_name):
    a = np.ones((2, HIDDEN), np.float32)
    b = np.ones((INTER, 2), np.float32)
    tensors = {f"{prefix}layers.1.mlp.up_proj.lora_A{adapter_name}.weight": a,
               f"{prefix}layers.1.mlp.up_proj.lora_B{adapter_name}.weight": b}
    write_adapter(tmp_path / "a", tensors, r=2, lora_alpha=2)
    adapter = load(tmp_path / "a")
    assert set(adapter.weights) == {(1, "up_proj")}


def test_all_seven_modules(tmp_path):
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    write_adapter(tmp_path / "a", make_tensors(r=8, modules=modules), r=8, lora_alpha=8, target_modules=list(modules))
    adapter = load(tmp_path / "a")
    assert len(adapter.weights) == 14 and adapter.modules() == set(modules)
    for (_, module), (a, b) in adapter.weights.items():
        assert a.shape == (8, DIMS.features[module][0]) and b.shape == (DIMS.features[module][1], 8)


def test_float16_bfloat16_and_float64_are_widened_to_float32(tmp_path):
    rng = np.random.default_rng(1)
    a32 = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    b32 = rng.standard_normal((Q, 4)).astype(np.float32)
    # bfloat16: the top 16 bits of each float32 (so the values are exact in both).
    a_bf16 = (a32.view(np.uint32) >> 16).astype(np.uint16)
    b_bf16 = (b32.view(np.uint32) >> 16).astype(np.uint16)
    folder = tmp_path / "bf16"
    write_adapter(folder, {})
    write_raw_safetensors(folder / "adapter_model.safetensors", {
        _key(0, "q_proj", "A"): ("BF16", [4, HIDDEN], a_bf16.tobytes()),
        _key(0, "q_proj", "B"): ("BF16", [Q, 4], b_bf16.tobytes())})
    a, b = load(folder).weights[(0, "q_proj")]
    np.testing.assert_array_equal(a, (a_bf16.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(b, (b_bf16.astype(np.uint32) << 16).view(np.float32) * 2)
    assert np.abs(a - a32).max() <= np.abs(a32).max() * 2 ** -7  # bfloat16 keeps 8 significant bits

    write_adapter(tmp_path / "f16", {_key(0, "q_proj", "A"): a32.astype(np.float16),
                                     _key(0, "q_proj", "B"): b32.astype(np.float16)})
    a, b = load(tmp_path / "f16").weights[(0, "q_proj")]
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, a32.astype(np.float16).astype(np.float32))
    write_adapter(tmp_path / "f64", {_key(0, "q_proj", "A"): a32.astype(np.float64),
                                     _key(0, "q_proj", "B"): b32.astype(np.float64)})
    a, b = load(tmp_path / "f64").weights[(0, "q_proj")]
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, a32)


def test_several_safetensors_files_are_merged(tmp_path):
    tensors = make_tensors(modules=("q_proj",), layers=(0,))
    folder = tmp_path / "a"
    write_adapter(folder, {k: v for k, v in tensors.items() if ".lora_A." in k})
    save_file({k: v for k, v in tensors.items() if ".lora_B." in k}, str(folder / "more.safetensors"))
    assert set(load(folder).weights) == {(0, "q_proj")}


def test_dims_from_an_hf_config():
    hf = SimpleNamespace(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                         intermediate_size=130, num_hidden_layers=5)
    dims = LoRAModelDims.from_hf_config(hf)
    assert dims.num_layers == 5
    assert dims.features == {"q_proj": (96, 96), "k_proj": (96, 48), "v_proj": (96, 48), "o_proj": (96, 96),
                             "gate_proj": (96, 130), "up_proj": (96, 130), "down_proj": (130, 96)}
    mha = SimpleNamespace(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
    assert LoRAModelDims.from_hf_config(mha).features["k_proj"] == (64, 64)  # no GQA: as many KV heads


def test_lora_request_checks_its_fields_and_keys_the_cache_by_adapter():
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("a", True, "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("a", 1, "")
    assert LoRARequest("a", 1, "/x").cache_key != LoRARequest("a", 2, "/x").cache_key
    assert LoRARequest("a", 1, "/x").cache_key != LoRARequest("b", 1, "/x").cache_key
    assert LoRARequest("a", 1, "/x") == LoRARequest("a", 1, "/x")


# ----- refusals ---------------------------------------------------------------------------


def _truncate(folder, keep: int | None = None, fraction: float = 0.5) -> None:
    path = folder / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: keep if keep is not None else int(len(raw) * fraction)])


def _replace_tensors(folder, tensors) -> None:
    (folder / "adapter_model.safetensors").unlink()
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _with(**changes):
    """Rewrite the config with ``changes``."""
    def apply(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return apply


def _tensors_changed(fn):
    def apply(folder):
        tensors = make_tensors()
        fn(tensors)
        _replace_tensors(folder, tensors)
    return apply


def _drop_b(tensors):
    del tensors[_key(1, "v_proj", "B")]


def _put(key, shape):
    def fn(tensors):
        tensors[key] = np.ones(shape, np.float32)
    return fn


def _nan(tensors):
    tensors[_key(0, "q_proj", "B")][3, 1] = np.nan


def _bin_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


def _raw_dtype(folder):
    write_raw_safetensors(folder / "adapter_model.safetensors",
                          {_key(0, "q_proj", "A"): ("I8", [4, HIDDEN], bytes(4 * HIDDEN))})


def _bad_header(folder):
    blob = b"{not json"
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)


REFUSALS = {
    "missing folder": (shutil.rmtree, "is not a folder"),
    "missing config": (lambda folder: (folder / "adapter_config.json").unlink(), "has no adapter_config.json"),
    "bad JSON": (lambda folder: (folder / "adapter_config.json").write_text("{r: 4,"), "not valid JSON"),
    "config not an object": (lambda folder: (folder / "adapter_config.json").write_text("[4]"),
                             "must hold a JSON object"),
    "DoRA": (_with(use_dora=True), "DoRA"),
    "modules_to_save": (_with(modules_to_save=["lm_head"]), "modules_to_save"),
    "LoRA bias": (_with(bias="lora_only"), "bias='lora_only'"),
    "fan_in_fan_out": (_with(fan_in_fan_out=True), "fan_in_fan_out"),
    "not LoRA": (_with(peft_type="IA3"), "only LORA"),
    "r not an integer": (_with(r="4"), "r must be a positive integer"),
    "alpha not a number": (_with(lora_alpha="8"), "lora_alpha must be a number"),
    "declared r differs": (_with(r=8), "has rank 4, but its config says 8"),
    "rank over max_lora_rank": (_tensors_changed(lambda t: t.update(make_tensors(r=32))), "exceeds --max-lora-rank 16"),
    "embedding target": (_tensors_changed(_put("base_model.model.model.embed_tokens.lora_embedding_A", (4, 100))),
                         "is not a LoRA A/B matrix"),
    "lm_head target": (_tensors_changed(_put("base_model.model.lm_head.lora_A.weight", (4, HIDDEN))),
                       "is not a LoRA A/B matrix"),
    "other module": (_tensors_changed(_put(_key(0, "qkv_proj", "A"), (4, HIDDEN))), "LoRA on 'qkv_proj'"),
    "layer out of range": (_tensors_changed(_put(_key(2, "q_proj", "A"), (4, HIDDEN))),
                           "is for layer 2, but the base model has 2 layers"),
    "A without B": (_tensors_changed(_drop_b), "layer 1 v_proj has lora_A but not its other half"),
    "in features": (_tensors_changed(_put(_key(0, "q_proj", "A"), (4, HIDDEN + 1))), "trained for another model"),
    "out features": (_tensors_changed(_put(_key(0, "v_proj", "B"), (Q, 4))), "trained for another model"),
    "A and B ranks differ": (_tensors_changed(_put(_key(0, "q_proj", "B"), (Q, 3))),
                             r"are not \[r, in\] and \[out, r\]"),
    "3-D tensor": (_tensors_changed(_put(_key(0, "q_proj", "A"), (1, 4, HIDDEN))), r"are not \[r, in\]"),
    "NaN": (_tensors_changed(_nan), "NaN or infinite"),
    "no LoRA weights": (lambda folder: _replace_tensors(folder, {}), "holds no LoRA weights"),
    "only a .bin": (_bin_only, "safe_serialization=True"),
    "truncated data": (_truncate, "does not fit its byte range"),
    "truncated header": (lambda folder: _truncate(folder, fraction=0.01), "header runs past the end"),
    "too short": (lambda folder: _truncate(folder, keep=5), "too short"),
    "header not JSON": (_bad_header, "header is not JSON"),
    "unsupported dtype": (_raw_dtype, "'I8' unsupported"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_adapter_and_the_problem(tmp_path, case):
    breaks, message = REFUSALS[case]
    folder = tmp_path / "adapter"
    write_adapter(folder)
    load(folder)  # sound before it is broken
    breaks(folder)
    with pytest.raises(LoRAAdapterError, match=message) as info:
        load(folder, name="my-adapter")
    assert isinstance(info.value, ValueError)  # the engine's callers catch ValueError
    assert "'my-adapter'" in str(info.value)


def test_oversized_file_refused_before_it_is_read(tmp_path, monkeypatch):
    from piston.step import lora_adapter

    write_adapter(tmp_path / "a")
    monkeypatch.setattr(lora_adapter, "MAX_ADAPTER_BYTES", 100)
    with pytest.raises(LoRAAdapterError, match="adapter_model.safetensors is 0 MiB, over the 0 MiB limit"):
        load(tmp_path / "a")


# ----- LoRASlots: host memory and device slots --------------------------------------------


class Slots:
    """A LoRASlots with a recording ``write_slot`` and a count of disk reads per adapter id."""

    def __init__(self, monkeypatch, max_loras: int = 2, max_cpu_loras: int | None = 3) -> None:
        self.writes: list[tuple[int, int | None]] = []  # (slot, adapter id or None)
        self.reads: dict[int, int] = {}
        real = lora_slots_module.load_adapter

        def counting_load(request, dims, max_rank):
            self.reads[request.lora_int_id] = self.reads.get(request.lora_int_id, 0) + 1
            return real(request, dims, max_rank)

        monkeypatch.setattr(lora_slots_module, "load_adapter", counting_load)
        self.slots = LoRASlots(LoRAConfig(max_loras, MAX_RANK, max_cpu_loras), DIMS, self.write)

    def write(self, slot: int, adapter) -> None:
        self.writes.append((slot, None if adapter is None else adapter.lora_int_id))

    def take_writes(self) -> list[tuple[int, int | None]]:
        writes, self.writes = self.writes, []
        return writes


@pytest.fixture
def adapters(tmp_path) -> dict[int, LoRARequest]:
    """Five sound adapters, ids 1..5, each with its own weights."""
    requests = {}
    for i in range(1, 6):
        write_adapter(tmp_path / f"a{i}", make_tensors(seed=i))
        requests[i] = LoRARequest(f"a{i}", i, str(tmp_path / f"a{i}"))
    return requests


def test_host_memory_keeps_max_cpu_loras_least_recently_used_out(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2, max_cpu_loras=3)
    for i in (1, 2, 3):
        s.slots.add(adapters[i])
    assert [r.lora_int_id for r in s.slots.host] == [1, 2, 3]
    s.slots.add(adapters[1])  # in memory: no read, now the most recently used
    assert s.reads == {1: 1, 2: 1, 3: 1}
    s.slots.add(adapters[4])  # 2 is the least recently used
    assert [r.lora_int_id for r in s.slots.host] == [3, 1, 4]
    s.slots.add(adapters[2])  # read again; 3 goes
    assert s.reads[2] == 2 and [r.lora_int_id for r in s.slots.host] == [1, 4, 2]
    assert s.slots.loaded_ids() == [1, 2, 4]
    assert s.writes == []  # host memory only: no slot written


def test_host_capacity_is_at_least_max_loras(monkeypatch, adapters):
    assert LoRAConfig(max_loras=3, max_cpu_loras=None).host_capacity == 3
    assert LoRAConfig(max_loras=2, max_cpu_loras=5).host_capacity == 5
    s = Slots(monkeypatch, max_loras=2, max_cpu_loras=None)
    for i in (1, 2, 3):
        s.slots.add(adapters[i])
    assert [r.lora_int_id for r in s.slots.host] == [2, 3]


def test_lora_config_validation():
    LoRAConfig(max_loras=2, max_lora_rank=64, max_cpu_loras=2).validate()
    for bad in (dict(max_loras=0), dict(max_loras=65), dict(max_lora_rank=0), dict(max_lora_rank=True),
                dict(max_loras=3, max_cpu_loras=2), dict(max_cpu_loras=0)):
        with pytest.raises(ValueError):
            LoRAConfig(**bad).validate()


def test_slots_for_maps_requests_to_slots_and_writes_each_adapter_once(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2)
    a1, a2 = adapters[1], adapters[2]
    out = s.slots.slots_for([a1, None, a2, a1])
    assert out.dtype == np.int32
    assert out.tolist() == [0, -1, 1, 0]  # empty slots first, in order
    assert s.take_writes() == [(0, 1), (1, 2)]
    assert s.slots.slots_for([a2, a1, None]).tolist() == [1, 0, -1]
    assert s.take_writes() == []  # already in place
    assert s.slots.slots_for([None, None]).tolist() == [-1, -1]
    assert s.slots.slots_for([]).tolist() == []
    assert s.reads == {1: 1, 2: 1}


def test_a_new_adapter_takes_the_least_recently_used_slot(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2)
    s.slots.slots_for([adapters[1], adapters[2]])  # 1 in slot 0, 2 in slot 1
    s.slots.slots_for([adapters[1]])  # slot 1 (adapter 2) is now the least recently used
    s.take_writes()
    assert s.slots.slots_for([adapters[3]]).tolist() == [1]
    assert s.take_writes() == [(1, 3)]
    # A step that needs 1 and 3 keeps both; then 2 comes back into the slot of the older one.
    assert s.slots.slots_for([adapters[3], adapters[1]]).tolist() == [1, 0]
    s.slots.slots_for([adapters[3]])
    assert s.slots.slots_for([adapters[2], adapters[3]]).tolist() == [0, 1]
    assert s.take_writes() == [(0, 2)]


def test_an_adapter_in_a_slot_is_used_even_after_host_eviction(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2, max_cpu_loras=2)
    s.slots.slots_for([adapters[1], adapters[2]])
    s.slots.add(adapters[3])  # evicts 1 from host memory; its slot still holds it
    assert all(r.lora_int_id != 1 for r in s.slots.host) and 1 in s.slots.loaded_ids()
    s.take_writes()
    assert s.slots.slots_for([adapters[1]]).tolist() == [0]
    assert s.take_writes() == [] and s.reads[1] == 1


def test_more_adapters_than_slots_in_one_step_raises(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2)
    with pytest.raises(RuntimeError, match="max_loras=2"):
        s.slots.slots_for([adapters[1], adapters[2], adapters[3], adapters[1]])


def test_a_broken_adapter_raises_from_slots_for(monkeypatch, adapters, tmp_path):
    s = Slots(monkeypatch, max_loras=2)
    with pytest.raises(LoRAAdapterError, match="is not a folder"):
        s.slots.slots_for([adapters[1], LoRARequest("gone", 9, str(tmp_path / "gone"))])
    assert 9 not in s.slots.loaded_ids()


def test_remove_unused_adapter_drops_host_copy_and_zeroes_its_slot(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2)
    s.slots.slots_for([adapters[1], adapters[2]])
    s.take_writes()
    assert s.slots.remove(2, in_use=False) is True
    assert s.take_writes() == [(1, None)]
    assert s.slots.loaded_ids() == [1]
    assert s.slots.remove(2, in_use=False) is False  # not loaded any more
    assert s.slots.remove(5, in_use=False) is False  # never loaded
    # Used again: read from disk into a free slot.
    assert s.slots.slots_for([adapters[2]]).tolist() == [1]
    assert s.reads[2] == 2


def test_remove_while_in_use_waits_for_release_unused(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2)
    s.slots.slots_for([adapters[1], adapters[2]])
    s.take_writes()
    assert s.slots.remove(1, in_use=True) is True
    assert s.slots.loaded_ids() == [1, 2] and s.take_writes() == []  # still serving its requests
    assert s.slots.slots_for([adapters[1]]).tolist() == [0]
    s.slots.release_unused({1, 2})
    assert s.slots.loaded_ids() == [1, 2]
    s.slots.release_unused({2})
    assert s.slots.loaded_ids() == [2] and s.take_writes() == [(0, None)]
    assert not s.slots.removed


def test_an_id_reused_for_another_folder_is_another_adapter(monkeypatch, adapters):
    """An application that names an id again with another folder (after remove_lora, while
    requests of the old folder may still run) gets the new folder's weights in a slot of
    their own; the old adapter keeps its slot."""
    s = Slots(monkeypatch, max_loras=2)
    [old_slot] = s.slots.slots_for([adapters[1]]).tolist()
    s.take_writes()
    other = LoRARequest("a1", 1, adapters[3].lora_path)
    new_weights = s.slots.add(other).weights[(0, "q_proj")][0]
    np.testing.assert_array_equal(new_weights, make_tensors(seed=3)[_key(0, "q_proj", "A")])
    assert s.take_writes() == []
    slots = s.slots.slots_for([adapters[1], other]).tolist()
    assert slots[0] == old_slot and slots[1] != old_slot
    assert s.take_writes() == [(slots[1], 1)]


def test_forget_slots_zeroes_them_and_they_are_written_again(monkeypatch, adapters):
    s = Slots(monkeypatch, max_loras=2)
    s.slots.slots_for([adapters[1], adapters[2]])
    s.take_writes()
    s.slots.forget_slots()
    assert sorted(s.take_writes()) == [(0, None), (1, None)]
    assert s.slots.slots_for([adapters[2]]).tolist() == [0]
    assert s.take_writes() == [(0, 2)] and s.reads == {1: 1, 2: 1}  # from host memory, not disk

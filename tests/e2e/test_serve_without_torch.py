"""`piston serve` on the TPU platform runs without torch: front end, engine process and all.

Where torch is installed, a ``sitecustomize`` on PYTHONPATH blocks it in the server and
in every process the server starts (``sys.modules["torch"] = None``), so any import of
torch anywhere fails the server. The TPU nox session runs this with no torch installed.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import TINY_ARGS, ServerProcess
from reference import reference

pytest.importorskip("jax")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def torch_free_tpu_server(tiny_models, tmp_path_factory):
    blocker = tmp_path_factory.mktemp("no-torch")
    (blocker / "sitecustomize.py").write_text(
        "import os, sys\nsys.modules['torch'] = None\n"
        "print(f'torch blocked in process {os.getpid()}', file=sys.stderr)\n")
    server = ServerProcess(tiny_models("llama"), *TINY_ARGS, "--served-model-name", "tiny",
                           env={"PISTON_PLATFORM": "tpu", "PYTHONPATH": str(blocker)})
    yield server.wait_ready(timeout=300)
    server.stop()


def test_serve_on_tpu_without_torch_matches_transformers(torch_free_tpu_server, tiny_models, smollm2_tokenizer):
    path = tiny_models("llama")
    ids = smollm2_tokenizer(PROMPT).input_ids
    expected, _ = reference().greedy(path, ids, 8)
    client = torch_free_tpu_server.openai()
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == smollm2_tokenizer.decode(expected, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(expected)
    log = torch_free_tpu_server.log_tail(50000)
    assert "EngineCore ready on tpu" in log
    # The blocker ran in the server and in the engine process it started (or torch is absent).
    assert log.count("torch blocked in process") >= 2 or importlib.util.find_spec("torch") is None

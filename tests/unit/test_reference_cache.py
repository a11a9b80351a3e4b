"""The transformers reference's disk cache (tests/reference.py): an answer is reused only for
the same call, arguments and model file contents, and comes back as the call gave it."""

from __future__ import annotations

import os

import numpy as np
from reference import CachedReference


class _Counting:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def greedy(self, path, prompt, max_new_tokens):
        self.calls.append(("greedy", path, tuple(prompt), max_new_tokens))
        with open(path, "rb") as f:
            seed = sum(f.read()) + sum(prompt) + max_new_tokens
        return [seed % 7, 3], np.random.default_rng(seed).standard_normal((2, 5)).astype(np.float32)

    def prompt_logprobs(self, path, prompt):
        self.calls.append(("prompt_logprobs", path, tuple(prompt)))
        return np.arange(6, dtype=np.float32).reshape(2, 3) + len(prompt)

    def config(self, path):
        self.calls.append(("config", path))
        return {"hidden_size": 8, "path_given": path}

    def build_tiny_model(self, name, folder, tokenizer):
        self.calls.append(("build_tiny_model", name))
        return folder


def test_answers_are_kept_by_call_arguments_and_file_contents(tmp_path):
    model = tmp_path / "a" / "model.bin"
    model.parent.mkdir()
    model.write_bytes(b"weights-1")
    copy = tmp_path / "b" / "model.bin"
    copy.parent.mkdir()
    copy.write_bytes(b"weights-1")
    impl = _Counting()
    cached = CachedReference(impl, str(tmp_path / "cache"), python=None)

    ids, rows = cached.greedy(str(model), [1, 2], 4)
    again_ids, again_rows = CachedReference(impl, str(tmp_path / "cache"), python=None).greedy(str(model), [1, 2], 4)
    assert len(impl.calls) == 1
    assert again_ids == ids and again_rows.dtype == np.float32 and np.array_equal(again_rows, rows)
    # The same contents elsewhere (a tiny model rebuilt in another session's folder) hit too.
    cached.greedy(str(copy), [1, 2], 4)
    assert len(impl.calls) == 1

    cached.greedy(str(model), [1, 3], 4)
    cached.greedy(str(model), [1, 2], 5)
    model.write_bytes(b"weights-2")
    changed_ids, changed_rows = cached.greedy(str(model), [1, 2], 4)
    assert len(impl.calls) == 4
    assert not np.array_equal(changed_rows, rows)

    assert np.array_equal(cached.prompt_logprobs(str(model), [5]), cached.prompt_logprobs(str(model), [5]))
    assert cached.config(str(model)) == cached.config(str(model)) == {"hidden_size": 8, "path_given": str(model)}
    assert len(impl.calls) == 6
    # Builders write folders: never answered from the cache.
    cached.build_tiny_model("llama", str(tmp_path), "tok")
    cached.build_tiny_model("llama", str(tmp_path), "tok")
    assert len(impl.calls) == 8


def test_a_folder_is_keyed_by_every_file_in_it(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.bin").write_bytes(b"x")
    impl = _Counting()
    cached = CachedReference(impl, str(tmp_path / "cache"), python=None)
    cached.config(str(folder))
    cached.config(str(folder))
    (folder / "config.json").write_text('{"changed": 1}')
    cached.config(str(folder))
    (folder / "tokenizer.json").write_text("{}")
    cached.config(str(folder))
    assert len(impl.calls) == 3


def test_least_recently_used_answers_go_first_past_the_size_limit(tmp_path):
    model = tmp_path / "model.bin"
    model.write_bytes(b"w")
    cache = tmp_path / "cache"
    impl = _Counting()
    cached = CachedReference(impl, str(cache), python=None)
    for n in range(3):
        cached.greedy(str(model), [n], 1)
    files = sorted(cache.iterdir(), key=lambda p: p.stat().st_mtime)
    for age, path in enumerate(files):  # distinct use times, oldest first: prompts 0, 1, 2
        os.utime(path, (1000 + age, 1000 + age))
    cached.greedy(str(model), [0], 1)  # a hit: prompt 0's answer is now the most recent
    size = max(p.stat().st_size for p in cache.iterdir())
    CachedReference(impl, str(cache), python=None, max_bytes=2 * size)
    assert len(list(cache.iterdir())) == 2
    calls = len(impl.calls)
    cached.greedy(str(model), [0], 1)
    cached.greedy(str(model), [2], 1)
    assert len(impl.calls) == calls  # both kept
    cached.greedy(str(model), [1], 1)
    assert len(impl.calls) == calls + 1  # the least recently used one was dropped

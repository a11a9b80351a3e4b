"""Benchmark datasets: what each request sends and how many tokens it asks back.

Three sources, all offline: ``random`` (seeded random token ids of a length range),
``sharegpt`` (a local ShareGPT JSON file) and ``prefix`` (many requests sharing one
long system prompt, to exercise the prefix cache). Every benchmark tool, and the
transformers baseline, draws its requests from here, so the same arguments give the
same requests everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class SampleRequest:
    prompt: str | list[int]  # token ids for random/prefix, text for sharegpt
    prompt_len: int
    expected_output_len: int


def add_dataset_args(parser: argparse.ArgumentParser, num_prompts: int = 64) -> None:
    """The dataset flags shared by every tool (vLLM's names where vLLM has them)."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", default="random",
                   choices=["random", "sharegpt", "prefix"])
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (for sharegpt)")
    g.add_argument("--num-prompts", type=int, default=num_prompts)
    g.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=128)
    g.add_argument("--output-len", "--random-output-len", dest="output_len", type=int,
                   default=None, help="tokens to generate (default 128; sharegpt: the reply's)")
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float,
                   default=0.0, help="lengths are uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--output-range-ratio", type=float, default=None,
                   help="range ratio for output lengths (default: --range-ratio)")
    g.add_argument("--prefix-len", type=int, default=256, help="shared prefix tokens (prefix)")
    g.add_argument("--suffix-len", type=int, default=32, help="per-request tokens (prefix)")
    g.add_argument("--dataset-seed", type=int, default=0, help="seed of the random datasets")


def check_dataset_args(args: argparse.Namespace) -> None:
    """Raise ValueError for dataset flags that cannot work, before any model is loaded."""
    import os

    if args.dataset == "sharegpt" and not (args.dataset_path and os.path.isfile(args.dataset_path)):
        raise ValueError(f"--dataset sharegpt needs --dataset-path FILE.json, a local ShareGPT "
                         f"file (got {args.dataset_path!r}); nothing is downloaded.")
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}.")


def sample_requests(args: argparse.Namespace, tokenizer) -> list[SampleRequest]:
    """The requests ``args`` (from add_dataset_args) describe."""
    check_dataset_args(args)
    output_len = args.output_len or 128
    if args.dataset == "random":
        out_ratio = args.range_ratio if args.output_range_ratio is None else args.output_range_ratio
        return random_requests(tokenizer, args.num_prompts, args.input_len, output_len,
                               args.range_ratio, args.dataset_seed, out_ratio)
    if args.dataset == "sharegpt":
        return sharegpt_requests(tokenizer, args.dataset_path, args.num_prompts,
                                 args.output_len, seed=args.dataset_seed)
    return prefix_requests(tokenizer, args.num_prompts, args.prefix_len, args.suffix_len,
                           output_len, args.dataset_seed)


def allowed_token_ids(tokenizer) -> np.ndarray:
    """Every token id of ``tokenizer`` that is not a special token."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.arange(len(tokenizer), dtype=np.int64)
    return ids[~np.isin(ids, np.fromiter(special, dtype=np.int64, count=len(special)))]


def _lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {ratio}.")
    low = max(1, int(length * (1 - ratio)))
    high = max(low, int(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def random_requests(tokenizer, num: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0,
                    output_range_ratio: float | None = None) -> list[SampleRequest]:
    """``num`` prompts of seeded random non-special token ids.

    Prompt and output lengths are uniform integers in [len*(1-r), len*(1+r)]; the
    output range ratio defaults to ``range_ratio``.
    """
    rng = np.random.default_rng(seed)
    vocab = allowed_token_ids(tokenizer)
    in_lens = _lengths(rng, num, input_len, range_ratio)
    out_ratio = range_ratio if output_range_ratio is None else output_range_ratio
    out_lens = _lengths(rng, num, output_len, out_ratio)
    return [SampleRequest(rng.choice(vocab, size=int(p)).tolist(), int(p), int(o))
            for p, o in zip(in_lens, out_lens)]


def sharegpt_requests(tokenizer, path: str, num: int, output_len: int | None = None,
                      max_len: int = 2048, seed: int = 0) -> list[SampleRequest]:
    """The first human turn of each conversation in a local ShareGPT JSON file as prompt.

    The output length is the token count of the gpt reply that follows (or
    ``output_len`` when given). Conversations shorter than two turns, with fewer than
    4 prompt or reply tokens, or longer than ``max_len`` together, are skipped; the
    rest are shuffled with ``seed`` and the first ``num`` kept.
    """
    data = load_json_list(path)
    order = np.random.default_rng(seed).permutation(len(data))
    requests: list[SampleRequest] = []
    for i in order:
        turns = data[i].get("conversations") or data[i].get("conversation") or []
        pair = _first_exchange(turns)
        if pair is None:
            continue
        prompt, reply = pair
        prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        reply_len = output_len or len(tokenizer(reply, add_special_tokens=False).input_ids)
        if prompt_len < 4 or reply_len < 4 or prompt_len + reply_len > max_len:
            continue
        requests.append(SampleRequest(prompt, prompt_len, reply_len))
        if len(requests) == num:
            break
    if not requests:
        raise ValueError(f"{path} holds no usable ShareGPT conversation (a list of "
                         '{"conversations": [{"from": "human", "value": ...}, '
                         '{"from": "gpt", "value": ...}]}).')
    return requests


def load_json_list(path: str) -> list:
    """The items of the JSON list in ``path``, read leniently: a file cut off in the middle
    of an item (as the ShareGPT V3 file on PyPI is) gives the complete items before the cut,
    with a warning. Anything else that is not a JSON list is an error."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        if not isinstance(data, list):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a list.")
        return data
    start = text.find("[")
    if start < 0 or text[:start].strip():
        raise ValueError(f"{path} is not a JSON list.")
    decoder, items, pos = json.JSONDecoder(), [], start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            logger.warning("%s is cut off after %d complete items (at byte %d of %d); using those.",
                           path, len(items), pos, len(text))
            break
        items.append(item)
    return items


def _first_exchange(turns: list[dict]) -> tuple[str, str] | None:
    for a, b in zip(turns, turns[1:]):
        if a.get("from") in ("human", "user") and b.get("from") in ("gpt", "assistant"):
            return a.get("value", ""), b.get("value", "")
    return None


def prefix_requests(tokenizer, num: int, prefix_len: int, suffix_len: int, output_len: int,
                    seed: int = 0) -> list[SampleRequest]:
    """``num`` prompts that all start with the same ``prefix_len`` random tokens (a
    long system prompt) followed by ``suffix_len`` tokens of their own."""
    rng = np.random.default_rng(seed)
    vocab = allowed_token_ids(tokenizer)
    prefix = rng.choice(vocab, size=prefix_len).tolist()
    return [SampleRequest(prefix + rng.choice(vocab, size=suffix_len).tolist(),
                          prefix_len + suffix_len, output_len) for _ in range(num)]

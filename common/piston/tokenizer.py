"""Load the tokenizer of a model folder or a .gguf file.

A folder with a ``tokenizer.json`` (every fast Hugging Face tokenizer has one) is read
straight with the ``tokenizers`` library: ``Tokenizer`` below, which does what the engine
and the server need of a transformers tokenizer (encode, decode, special tokens, the chat
template) in a tenth of the start-up time, since importing transformers also imports
torch. Anything else (a sentencepiece-only folder, a hub id) goes through transformers.

Converting a GGUF file's tokenizer takes seconds, so the converted tokenizer is saved
once under the cache directory (keyed by file name and size) and reloaded from there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, NamedTuple, Sequence

from piston.chat_template import render_chat
from piston.model_resolver import cache_dir

logger = logging.getLogger(__name__)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def load_tokenizer(model_path: str, tokenizer_path: str | None = None):
    """The tokenizer for ``tokenizer_path`` (if given) else ``model_path``.

    Either may be a folder with tokenizer files or a .gguf file. Raises ValueError with
    the cause when no tokenizer can be loaded from it.
    """
    path = tokenizer_path or model_path
    try:
        if path.endswith(".gguf") and os.path.isfile(path):
            return _load_gguf_tokenizer(path)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return Tokenizer.from_folder(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"Could not load a tokenizer from {path}: {type(e).__name__}: {e}. "
                         f"Pass --tokenizer with a folder that holds tokenizer files "
                         f"(tokenizer.json or tokenizer.model, tokenizer_config.json).") from e


class Encoding(NamedTuple):
    input_ids: list[int]


class Tokenizer:
    """A fast Hugging Face tokenizer from its files, without transformers: ``tokenizer.json``
    for the vocabulary and rules, ``tokenizer_config.json`` for the special tokens, the
    chat template from there or from ``chat_template.jinja``."""

    def __init__(self, backend, config: dict[str, Any], chat_template: str | None) -> None:
        self.backend_tokenizer = backend
        self.init_kwargs = config
        self.chat_template = chat_template
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name))
            setattr(self, name, text)
            setattr(self, f"{name}_id", backend.token_to_id(text) if text is not None else None)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.all_special_ids = sorted(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
        _apply_bos_eos_flags(backend, config, self.bos_token, self.eos_token)

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(os.path.join(folder, "tokenizer.json"))
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
        for name in SPECIAL_TOKEN_NAMES:
            config.setdefault(name, special_map.get(name))
        return cls(backend, config, _chat_template(folder, config))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self.encode(text, add_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self.backend_tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        # As transformers: the clean-up is for WordPiece vocabularies and would corrupt BPE text.
        if clean_up_tokenization_spaces and type(self.backend_tokenizer.model).__name__ != "BPE":
            text = _clean_up(text)
        return text

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str | None]:
        return [self.backend_tokenizer.id_to_token(i) for i in token_ids]

    def apply_chat_template(self, conversation: list[dict[str, Any]], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True, **kwargs: Any):
        """The conversation through the chat template: text, or (``tokenize``) its ids
        without added special tokens (the template writes them), as transformers does."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("This tokenizer has no chat template; pass chat_template=...")
        special = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES}
        text = render_chat(template, conversation, add_generation_prompt=add_generation_prompt, tools=tools,
                           documents=documents, special_tokens=special, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({k: v for k, v in self.init_kwargs.items() if k != "chat_template"}, f, indent=2)
        if self.chat_template is not None:
            with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
                f.write(self.chat_template)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(folder: str, config: dict[str, Any]) -> str | None:
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    template = config.get("chat_template") or _read_json(os.path.join(folder, "chat_template.json")).get(
        "chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _apply_bos_eos_flags(backend, config: dict[str, Any], bos: str | None, eos: str | None) -> None:
    """transformers rebuilds a Llama-style post-processor from add_bos_token/add_eos_token
    when the config sets them; so do we, so both add the same special tokens."""
    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    if add_bos is None and add_eos is None:
        return
    from tokenizers import processors

    add_bos = bool(add_bos) and bos is not None and backend.token_to_id(bos) is not None
    add_eos = bool(add_eos) and eos is not None and backend.token_to_id(eos) is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _clean_up(text: str) -> str:
    # transformers' clean_up_tokenization: no space before punctuation and contractions.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# ----- GGUF files -------------------------------------------------------------------------


def gguf_tokenizer_cache(gguf_path: str) -> str:
    """Where the converted tokenizer of ``gguf_path`` is kept."""
    name = os.path.basename(gguf_path)
    return os.path.join(cache_dir(), "tokenizers", f"{name}-{os.path.getsize(gguf_path)}")


def _load_gguf_tokenizer(gguf_path: str):
    cached = gguf_tokenizer_cache(gguf_path)
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return Tokenizer.from_folder(cached)
    from transformers import AutoTokenizer

    logger.info("Converting the tokenizer of %s (once; cached in %s).", gguf_path, cached)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                              gguf_file=os.path.basename(gguf_path))
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    try:
        _save_atomically(tokenizer, cached)
    except OSError as e:  # a read-only cache must not stop the run
        logger.warning("Could not cache the converted tokenizer in %s: %s", cached, e)
        return tokenizer
    return Tokenizer.from_folder(cached)


def _gguf_chat_template(gguf_path: str) -> str | None:
    from piston.step.gguf_metadata import open_gguf

    field = open_gguf(gguf_path).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()


def _save_atomically(tokenizer, target: str) -> None:
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tokenizer-")
    try:
        tokenizer.save_pretrained(tmp)
        # A directory rename is atomic; if another process won the race, keep its copy.
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Load the tokenizer of a model folder or a .gguf file.

Converting a GGUF file's tokenizer takes seconds, so the converted tokenizer is saved
once under the cache directory (keyed by file name and size) and reloaded from there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from piston.model_resolver import cache_dir

logger = logging.getLogger(__name__)


def load_tokenizer(model_path: str, tokenizer_path: str | None = None):
    """A transformers tokenizer for ``tokenizer_path`` (if given) else ``model_path``.

    Either may be a folder with tokenizer files or a .gguf file. Raises ValueError with
    the cause when no tokenizer can be loaded from it.
    """
    path = tokenizer_path or model_path
    try:
        if path.endswith(".gguf") and os.path.isfile(path):
            return _load_gguf_tokenizer(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"Could not load a tokenizer from {path}: {type(e).__name__}: {e}. "
                         f"Pass --tokenizer with a folder that holds tokenizer files "
                         f"(tokenizer.json or tokenizer.model, tokenizer_config.json).") from e


def gguf_tokenizer_cache(gguf_path: str) -> str:
    """Where the converted tokenizer of ``gguf_path`` is kept."""
    name = os.path.basename(gguf_path)
    return os.path.join(cache_dir(), "tokenizers", f"{name}-{os.path.getsize(gguf_path)}")


def _load_gguf_tokenizer(gguf_path: str):
    from transformers import AutoTokenizer

    cached = gguf_tokenizer_cache(gguf_path)
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cached)
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

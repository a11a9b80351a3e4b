"""Piston's tokenizer (tokenizers + the chat template, no transformers) gives what
transformers gives on the same files: ids, text, special tokens and chat prompts."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from piston.tokenizer import Tokenizer, gguf_tokenizer_cache, load_tokenizer  # noqa: E402

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnewlines", "Café crème brûlée, naïve jalapeño",
         "日本語のテキスト 中文 한국어 😀🎉", "<|im_start|>user\nhi<|im_end|>", "don't stop . , ! ?", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def both(smollm2_path):
    ours = load_tokenizer(smollm2_path)
    assert isinstance(ours, Tokenizer)
    reference = transformers.AutoTokenizer.from_pretrained(gguf_tokenizer_cache(smollm2_path))
    return ours, reference


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("special", [True, False])
def test_encode_and_decode_equal_transformers(both, text, special):
    ours, ref = both
    ids = ours(text, add_special_tokens=special).input_ids
    assert ids == ref(text, add_special_tokens=special).input_ids
    for skip in (True, False):
        for clean in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)


def test_special_tokens_equal_transformers(both):
    ours, ref = both
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name)
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_id")
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(both, conversation, add_generation_prompt):
    ours, ref = both
    kwargs = dict(add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conversation, tokenize=False, **kwargs) == \
        ref.apply_chat_template(conversation, tokenize=False, **kwargs)
    assert ours.apply_chat_template(conversation, **kwargs) == \
        list(ref.apply_chat_template(conversation, tokenize=True, **kwargs)["input_ids"])


def test_saved_tokenizer_loads_back_the_same(both, tmp_path):
    ours, _ = both
    ours.save_pretrained(str(tmp_path))
    again = Tokenizer.from_folder(str(tmp_path))
    assert again.encode(TEXTS[2]) == ours.encode(TEXTS[2]) and again.chat_template == ours.chat_template
    assert again.eos_token_id == ours.eos_token_id


def test_front_end_loads_without_transformers(smollm2_path):
    import subprocess
    import sys

    code = ("import sys\nfrom piston.engine.arg_utils import EngineArgs\nfrom piston.tokenizer import load_tokenizer\n"
            f"c = EngineArgs(model={smollm2_path!r}).create_engine_config()\n"
            "t = load_tokenizer(c.model_config.path)\n"
            "print('transformers' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]

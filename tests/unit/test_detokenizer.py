"""IncrementalDetokenizer on a tiny byte-level BPE that splits multi-byte characters."""

from __future__ import annotations

import pytest
from piston.engine.detokenizer import IncrementalDetokenizer, decode_token
from piston.step.sampling_params import SamplingParams
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, jalapeño.",
    "日本語のテキストです。中文文本也在这里。",
    "Emoji: 😀🎉🚀 👍🏽 and more 🤖 text.",
    "STOP here and then continue. The end.",
] * 3

TEXTS = [
    "Hello world, the quick brown fox.",
    "Emoji 😀🎉🚀 👍🏽 🤖 and 𝄞 ∑ unseen ones",
    "日本語のテキスト, 中文文本 and 한국어",
    "Café crème brûlée, naïve jalapeño façade",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", clean_up_tokenization_spaces=False
    )


def stream(tok, ids, params=None, prompt=None, chunk=1, stop_terminated=False):
    """Feed ids `chunk` at a time; returns (detokenizer, deltas, stop string)."""
    det = IncrementalDetokenizer(tok, prompt or tok.encode("Say:"), params or SamplingParams())
    deltas, stop = [], None
    for start in range(0, len(ids), chunk):
        last = start + chunk >= len(ids)
        stop = det.update(ids[start : start + chunk], stop_terminated and last)
        finished = last or stop is not None
        deltas.append(det.get_next_output_text(finished=finished, delta=True))
        if stop is not None:
            break
    return det, deltas, stop


def test_tokenizer_splits_multibyte_characters(tok):
    ids = tok.encode(TEXTS[1])
    assert any("\ufffd" in decode_token(tok, i) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_deltas_concatenate_to_full_decode(tok, text, chunk):
    ids = tok.encode(text)
    det, deltas, _ = stream(tok, ids, chunk=chunk)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert det.output_text == text and det.token_ids == ids


@pytest.mark.parametrize("text", TEXTS)
def test_no_replacement_char_while_a_character_is_split(tok, text):
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    for token_id in tok.encode(text):
        det.update([token_id], stop_terminated=False)
        assert "\ufffd" not in det.output_text
        assert text.startswith(det.output_text)


def test_long_output_stays_correct_past_window_trimming(tok):
    text = " ".join(TEXTS) * 8
    ids = tok.encode(text)
    assert len(ids) > 600
    _, deltas, _ = stream(tok, ids)
    assert "".join(deltas) == text


def test_stop_string_truncates_before_it(tok):
    params = SamplingParams(stop=["STOP"])
    det, deltas, stop = stream(tok, tok.encode("Hello world STOP here and then"), params)
    assert stop == "STOP"
    assert det.output_text == "Hello world " == "".join(deltas)


def test_stop_string_kept_with_include_stop_str_in_output(tok):
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    det, deltas, stop = stream(tok, tok.encode("Hello world STOP here and then"), params)
    assert stop == "STOP"
    assert det.output_text == "Hello world STOP" == "".join(deltas)


@pytest.mark.parametrize("stop_str", ["fox jumps", "😀🎉", "日本語"])
def test_stop_string_spanning_tokens_is_found(tok, stop_str):
    text = f"the quick brown {stop_str} tail"
    ids = tok.encode(text)
    assert not any(stop_str in decode_token(tok, i) for i in ids)
    det, deltas, stop = stream(tok, ids, SamplingParams(stop=[stop_str]))
    assert stop == stop_str
    assert det.output_text == "the quick brown " == "".join(deltas)


def test_earliest_stop_string_wins_within_one_step(tok):
    params = SamplingParams(stop=["end", "STOP"])
    det, _, stop = stream(tok, tok.encode("go STOP and end"), params, chunk=100)
    assert stop == "STOP" and det.output_text == "go "


def test_partial_stop_string_is_held_back_until_finish(tok):
    params = SamplingParams(stop=["STOP"])
    ids = tok.encode("Hello world ST")
    det = IncrementalDetokenizer(tok, [], params)
    det.update(ids, stop_terminated=False)
    assert det.get_next_output_text(finished=False, delta=True) == "Hello world"
    assert det.get_next_output_text(finished=False, delta=False) == "Hello world"
    assert det.get_next_output_text(finished=True, delta=True) == " ST"
    assert det.get_next_output_text(finished=True, delta=False) == "Hello world ST"


def test_nothing_is_held_back_without_stop_strings(tok):
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    det.update(tok.encode("Hello world"), stop_terminated=False)
    assert det.get_next_output_text(finished=False, delta=True) == "Hello world"
    assert det.get_next_output_text(finished=False, delta=True) == ""


def test_stop_token_text_is_left_out(tok):
    ids = tok.encode("Hello") + [tok.eos_token_id]
    params = SamplingParams(skip_special_tokens=False)
    det, _, stop = stream(tok, ids, params, chunk=100, stop_terminated=True)
    assert stop is None
    assert det.output_text == "Hello" and det.token_ids == ids


def test_stop_token_text_kept_with_include_stop_str_in_output(tok):
    ids = tok.encode("Hello") + [tok.eos_token_id]
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    det, _, _ = stream(tok, ids, params, chunk=100, stop_terminated=True)
    assert det.output_text == "Hello<eos>"


def test_special_tokens_skipped_mid_stream(tok):
    ids = tok.encode("Hello") + [tok.eos_token_id] + tok.encode(" world")
    _, deltas, _ = stream(tok, ids)
    assert "".join(deltas) == "Hello world"


def test_min_tokens_defers_stop_strings(tok):
    ids = tok.encode("STOP now, later STOP again")
    params = SamplingParams(stop=["STOP"], min_tokens=3, max_tokens=50)
    det, _, stop = stream(tok, ids, params)
    assert stop == "STOP" and det.output_text == "STOP now, later "


def test_first_token_decodes_in_prompt_context(tok):
    ids = tok.encode(" world, the fox")
    _, deltas, _ = stream(tok, ids, prompt=tok.encode("Hello"))
    assert "".join(deltas) == " world, the fox"


def test_decode_token_shows_special_and_partial_tokens(tok):
    assert decode_token(tok, tok.eos_token_id) == "<eos>"
    assert decode_token(tok, tok.encode("Hello")[0]) == tok.decode(tok.encode("Hello")[:1])


@pytest.mark.parametrize("text", TEXTS)
def test_window_decoding_without_decode_stream_gives_the_same_text(tok, text, monkeypatch):
    import piston.engine.detokenizer as detokenizer

    ids = tok.encode(text)
    fast, fast_deltas, _ = stream(tok, ids)
    monkeypatch.setattr(detokenizer, "DecodeStream", None)
    slow, slow_deltas, _ = stream(tok, ids)
    assert slow._stream is None and fast._stream is not None
    assert slow_deltas == fast_deltas
    assert slow.output_text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

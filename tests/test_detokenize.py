"""Incremental detokenization with stop strings (lmforge.inference.detokenize)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lmforge.inference.detokenize import REPLACEMENT, TextStream
from lmforge.tokenizer import Tokenizer

CORPUS = [
    "Hello world. The quick brown fox jumps over the lazy dog.\n",
    "Bonjour le monde, ça va très bien. Überraschung für alle!\n",
    "Привет, мир! Как дела? Γειά σου Κόσμε.\n",
    "你好，世界。今天天气很好。用户：你好吗？\n",
    "こんにちは世界。日本語のテキストです。\n",
    "안녕하세요 세계. 😀🎉👍 emoji and 🧑‍🚀 too.\n",
] * 3

TEXTS = [
    "Hello world, ça va? 你好世界 😀!",
    "Привет мир. こんにちは 🎉🎉 Γειά",
    "unseen: ß ŋ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ 🦄 \u0301 \x00 tab\tend",
    "",
    "😀",
]

ALPHABET = sorted(set("".join(CORPUS)) | set("𝔘☃🦄ß"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer.train(CORPUS, kind="bpe", vocab_size=330)
    # the test is only meaningful when multi-byte characters really are split across tokens
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("世界 😀 мир")]
    assert any(REPLACEMENT in p for p in pieces)
    return tokenizer


def stream_all(tok: Tokenizer, text: str, stop: list[str] | None = None) -> tuple[list[str], str, TextStream]:
    stream = TextStream(tok, stop)
    pieces = [stream.push(i) for i in tok.encode(text)]
    return pieces, stream.close(), stream


# ------------------------------------------------------------------ no stop strings
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_full_decode(tok, text):
    pieces, tail, stream = stream_all(tok, text)
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) + tail == tok.decode(tok.encode(text)) == text
    assert stream.text == text


def test_text_is_released_as_soon_as_it_is_final(tok):
    text = "Hello world"
    stream = TextStream(tok)
    released = ""
    for i, token in enumerate(tok.encode(text)):
        released += stream.push(token)
        assert released == tok.decode(tok.encode(text)[:i + 1])  # ASCII: nothing held back
    assert stream.close() == ""


def test_split_character_is_held_back_then_released_whole(tok):
    ids = tok.encode("a😀")
    assert len(ids) > 2  # the emoji takes several byte tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert pieces[0] == "a"
    assert all(p == "" for p in pieces[1:-1])
    assert pieces[-1] == "😀"


def test_close_releases_an_unfinished_character(tok):
    ids = tok.encode("a😀")
    stream = TextStream(tok)
    out = "".join(stream.push(i) for i in ids[:-1])
    assert out == "a"
    assert stream.close() == tok.decode(ids[:-1])[1:]  # whatever the partial bytes decode to


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters=REPLACEMENT)),
    st.text(alphabet=st.sampled_from(ALPHABET)),
))
def test_streaming_never_emits_replacement_character(tok, text):
    pieces, tail, stream = stream_all(tok, text)
    assert all(REPLACEMENT not in p for p in pieces)
    assert REPLACEMENT not in tail
    assert "".join(pieces) + tail == text


# ------------------------------------------------------------------ stop strings
def test_stop_string_split_across_tokens_is_not_emitted(tok):
    stop = "###END###"
    assert len(tok.encode(stop)) > 1
    pieces, tail, stream = stream_all(tok, "Hello there. ###END### and more text", [stop])
    out = "".join(pieces) + tail
    assert out == "Hello there. "
    assert stream.stopped and stream.text == "Hello there. "
    assert tail == ""
    assert stream.push(tok.encode("x")[0]) == ""  # nothing after a stop


def test_text_before_stop_is_released_before_the_stop_arrives(tok):
    stream = TextStream(tok, ["STOP"])
    released = "".join(stream.push(i) for i in tok.encode("Hello world "))
    assert released == "Hello world "
    released += "".join(stream.push(i) for i in tok.encode("ST"))
    assert released == "Hello world "  # "ST" might begin the stop string: held back
    released += "".join(stream.push(i) for i in tok.encode("OP after"))
    assert released == "Hello world "
    assert stream.close() == ""


def test_partial_stop_prefix_is_released_by_close(tok):
    pieces, tail, stream = stream_all(tok, "Hello ##", ["###END###"])
    assert "".join(pieces) == "Hello "
    assert tail == "##"
    assert not stream.stopped
    assert stream.text == "Hello ##"


def test_false_start_of_stop_is_released_later(tok):
    pieces, tail, _ = stream_all(tok, "a ST then more words", ["STOP"])
    assert "".join(pieces) + tail == "a ST then more words"
    assert "".join(pieces).startswith("a ST t")  # released once it can no longer become "STOP"


def test_earliest_of_several_stops_wins(tok):
    pieces, tail, stream = stream_all(tok, "one two three four", ["four", "two", "three"])
    assert "".join(pieces) + tail == "one "
    assert stream.text == "one "


def test_stop_at_the_start(tok):
    pieces, tail, stream = stream_all(tok, "\n\nHello", ["\n\n"])
    assert "".join(pieces) + tail == ""
    assert stream.stopped


def test_stop_that_overlaps_itself(tok):
    pieces, tail, _ = stream_all(tok, "aaab aaaab", ["aaaa"])
    assert "".join(pieces) + tail == "aaab "


@pytest.mark.parametrize("text, stop, expected", [
    ("你好世界，今天", "世界", "你好"),
    ("你好世界，今天", "好世", "你"),
    ("用户：你好吗？助手：很好", "助手：", "用户：你好吗？"),
    ("abc😀 def", "c😀", "ab"),
    ("Привет мир и всё", "т мир", "Приве"),
])
def test_multibyte_stop_string_is_not_emitted(tok, text, stop, expected):
    pieces, tail, stream = stream_all(tok, text, [stop])
    out = "".join(pieces) + tail
    assert stop[0] not in out[len(expected):]  # not even the first character of the stop string
    assert out == expected
    assert stream.text == expected


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(alphabet=st.sampled_from(ALPHABET), max_size=20),
    stop=st.text(alphabet=st.sampled_from(ALPHABET), min_size=1, max_size=5),
    after=st.text(alphabet=st.sampled_from(ALPHABET), max_size=10),
)
def test_stop_property(tok, before, stop, after):
    text = before + stop + after
    expected = text[:text.find(stop)]
    pieces, tail, stream = stream_all(tok, text, [stop])
    out = "".join(pieces) + tail
    assert out == expected
    assert stream.stopped and stream.text == expected


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(alphabet=st.sampled_from("abc xyz.\n"), max_size=30),
    stop=st.text(alphabet=st.sampled_from("abc xyz.\n"), min_size=1, max_size=5),
    after=st.text(alphabet=st.sampled_from("abc xyz.\n"), max_size=10),
)
def test_stop_property_ascii(tok, before, stop, after):
    text = before + stop + after
    expected = text[:text.find(stop)]
    pieces, tail, stream = stream_all(tok, text, [stop])
    assert "".join(pieces) + tail == expected
    assert stream.text == expected


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(ALPHABET), max_size=30),
    stop=st.text(alphabet=st.sampled_from(ALPHABET), min_size=1, max_size=4),
)
def test_without_a_stop_match_everything_comes_out(tok, text, stop):
    assume(stop not in text)
    pieces, tail, stream = stream_all(tok, text, [stop])
    assert "".join(pieces) + tail == text
    assert not stream.stopped
    assert all(REPLACEMENT not in p for p in pieces)


def test_each_token_decodes_only_the_last_few_tokens(tok, monkeypatch):
    """Streaming a long completion costs O(n), not O(n^2): each push decodes a few tokens, not all so far."""
    text = " ".join(CORPUS) * 2
    ids = tok.encode(text)
    assert len(ids) > 500
    lengths = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: lengths.append(len(ids)) or decode(ids, **kw))
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    during = max(lengths)
    assert "".join(pieces) + stream.close() == text
    assert during <= 8  # the pending tokens (a split character is up to 4) and the previous piece's

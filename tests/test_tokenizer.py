"""Training, saving and loading tokenizers (lmforge.tokenizer)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.tokenizer import (
    BOS,
    EOS,
    PAD,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    UNK,
    Tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Le cœur a ses raisons que la raison ne connaît point.\n",
    "Ἐν ἀρχῇ ἦν ὁ λόγος. Съешь же ещё этих мягких французских булок.\n",
    "吾輩は猫である。名前はまだ無い。 天下第一 😀🎉\n",
    "def main():\n\treturn 42  # <|eos|> marks the end\n",
    "windows line\r\n",
] * 4

SAMPLES = [
    "The lazy fox.",
    "raison d'être, cœur",
    "λόγος и булок",
    "猫である 😀",
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(CORPUS, kind="bpe", vocab_size=320)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return Tokenizer.train(CORPUS, kind="char")


# ------------------------------------------------------------------ training
def test_bpe_training_basics(bpe):
    assert bpe.kind == "bpe"
    assert 256 + 3 < bpe.vocab_size <= 320
    assert bpe.special == {"pad": PAD, "bos": BOS, "eos": EOS}
    ids = {bpe.pad_id, bpe.bos_id, bpe.eos_id}
    assert None not in ids and len(ids) == 3
    assert bpe.special_ids == ids
    # the merges learnt something: a frequent word needs fewer tokens than bytes
    assert len(bpe.encode("the lazy dog")) < len(b"the lazy dog")


def test_bpe_default_vocab_size_is_a_cap():
    tok = Tokenizer.train(["tiny text"], kind="bpe")
    assert tok.vocab_size <= 8192
    assert tok.decode(tok.encode("tiny text!")) == "tiny text!"


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_samples(bpe, text):
    ids = bpe.encode(text)
    assert all(isinstance(i, int) and 0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_encode_batch_matches_encode(bpe, char):
    for tok in (bpe, char):
        assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_char_training_basics(char):
    assert char.kind == "char"
    assert char.special == {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK}
    alphabet = set("".join(CORPUS))
    assert char.vocab_size == len(alphabet) + 4
    # one token per character
    for text in SAMPLES:
        assert len(char.encode(text)) == len(text)


def test_char_round_trips_seen_characters(char):
    text = "".join(sorted(set("".join(CORPUS))))  # every seen character, newline, tab and \r too
    assert char.decode(char.encode(text)) == text
    assert char.decode(char.encode("\r\n\r\n")) == "\r\n\r\n"


def test_char_maps_unseen_characters_to_unk(char):
    unk_id = char.hf.token_to_id(UNK)
    ids = char.encode("aZb€")  # 'Z' and '€' are not in the corpus
    assert "Z" not in "".join(CORPUS) and "€" not in "".join(CORPUS)
    assert ids[0] == char.encode("a")[0] and ids[2] == char.encode("b")[0]
    assert ids[1] == unk_id and ids[3] == unk_id
    assert char.decode(ids, skip_special_tokens=False) == f"a{UNK}b{UNK}"
    assert char.decode(ids) == "ab"
    assert unk_id in char.special_ids


def test_char_vocab_size_keeps_most_frequent_characters():
    tok = Tokenizer.train(["aaaaabbbbccd"], kind="char", vocab_size=4 + 2)
    assert tok.vocab_size == 6
    unk_id = tok.hf.token_to_id(UNK)
    ids = tok.encode("abcd")
    assert ids[0] != unk_id and ids[1] != unk_id
    assert ids[2] == unk_id and ids[3] == unk_id


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(sorted(set("".join(CORPUS))))))
def test_char_round_trip_property(char, text):
    assert char.decode(char.encode(text)) == text


# ------------------------------------------------------------------ the literal-text property
@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8")),
    st.lists(st.one_of(st.text(max_size=5), st.sampled_from([EOS, BOS, PAD, UNK, "<|", "|>", "😀", "\x00", "\r\n"])))
    .map("".join),
))
def test_bpe_round_trips_any_text_literally(bpe, text):
    ids = bpe.encode(text)
    assert not set(ids) & bpe.special_ids  # user text never becomes a special token
    assert bpe.decode(ids) == text
    assert bpe.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", [EOS, f"before {EOS} after", f"{BOS}{PAD}{EOS}", "emoji 🧑‍🚀 and \x07 bell"])
def test_special_token_text_is_encoded_literally(bpe, char, text):
    ids = bpe.encode(text)
    assert bpe.eos_id not in ids and bpe.bos_id not in ids and bpe.pad_id not in ids
    assert len(ids) > 1
    assert bpe.decode(ids) == text
    cids = char.encode(text)
    assert not set(cids) & char.special_ids - {char.hf.token_to_id(UNK)}
    if "🧑" not in text:  # only seen characters
        assert char.decode(cids) == text


def test_decode_skips_real_special_tokens(bpe):
    ids = [bpe.bos_id, *bpe.encode("hi"), bpe.eos_id, bpe.pad_id]
    assert bpe.decode(ids) == "hi"
    assert bpe.decode(ids, skip_special_tokens=False) == f"{BOS}hi{EOS}{PAD}"


# ------------------------------------------------------------------ persistence
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_writes_standard_files(tmp_path, bpe, char, kind):
    tok = bpe if kind == "bpe" else char
    tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([TOKENIZER_CONFIG_FILE, TOKENIZER_FILE])
    hf = HFTokenizer.from_file(str(tmp_path / "tok" / TOKENIZER_FILE))
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    config = json.loads((tmp_path / "tok" / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS
    assert config["eos_token"] == EOS
    assert config["pad_token"] == PAD
    if kind == "char":
        assert config["unk_token"] == UNK
    else:
        assert "unk_token" not in config
    assert config["lmforge_kind"] == kind
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_load_restores_ids_and_behaviour(tmp_path, bpe, char, kind):
    tok = bpe if kind == "bpe" else char
    tok.save(tmp_path)
    for path in (tmp_path, tmp_path / TOKENIZER_FILE, str(tmp_path)):
        loaded = Tokenizer.load(path)
        assert loaded.kind == kind
        assert loaded.special == tok.special
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert loaded.special_ids == tok.special_ids
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.fingerprint() == tok.fingerprint()
        for text in [*SAMPLES, f"x{EOS}y"]:
            assert loaded.encode(text) == tok.encode(text)
        assert loaded.eos_id not in loaded.encode(f"x{EOS}y")  # still literal after loading
    if kind == "char":
        assert Tokenizer.load(tmp_path).hf.token_to_id(UNK) == char.hf.token_to_id(UNK)


def test_load_reads_token_objects_and_chat_template(tmp_path, bpe):
    bpe.save(tmp_path)
    config = json.loads((tmp_path / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
    config["eos_token"] = {"content": EOS, "special": True}
    config["chat_template"] = "{{ messages }}"
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.eos_id == bpe.eos_id
    assert loaded.chat_template == "{{ messages }}"
    loaded.save(tmp_path / "again")
    assert Tokenizer.load(tmp_path / "again").chat_template == "{{ messages }}"


def test_load_bare_tokenizer_json_finds_special_tokens(tmp_path, char):
    char.save(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).unlink()
    loaded = Tokenizer.load(tmp_path)
    assert loaded.special == char.special
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (char.bos_id, char.eos_id, char.pad_id)
    assert loaded.kind == "unknown"


def test_fingerprint_differs_between_tokenizers(bpe, char):
    other = Tokenizer.train(CORPUS[:1], kind="bpe", vocab_size=300)
    assert len({bpe.fingerprint(), char.fingerprint(), other.fingerprint()}) == 3
    assert bpe.fingerprint() == Tokenizer.train(CORPUS, kind="bpe", vocab_size=320).fingerprint()


# ------------------------------------------------------------------ errors
def test_unknown_kind_is_config_error():
    with pytest.raises(ConfigError, match="wordpiece"):
        Tokenizer.train(["abc"], kind="wordpiece")


@pytest.mark.parametrize("vocab_size", [2, 100, 256, 259])
def test_too_small_bpe_vocab_is_config_error(vocab_size):
    with pytest.raises(ConfigError, match=str(vocab_size)):
        Tokenizer.train(["abc"], kind="bpe", vocab_size=vocab_size)


def test_smallest_bpe_vocab_is_accepted():
    tok = Tokenizer.train(["abc abc abc"], kind="bpe", vocab_size=260)
    assert tok.decode(tok.encode("abc xyz")) == "abc xyz"


@pytest.mark.parametrize("vocab_size", [1, 4])
def test_too_small_char_vocab_is_config_error(vocab_size):
    with pytest.raises(ConfigError):
        Tokenizer.train(["abc"], kind="char", vocab_size=vocab_size)


def test_config_error_is_an_lmforge_error():
    assert issubclass(ConfigError, LmforgeError) and issubclass(CheckpointError, LmforgeError)


def test_load_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match=TOKENIZER_FILE):
        Tokenizer.load(tmp_path)
    with pytest.raises(CheckpointError):
        Tokenizer.load(tmp_path / "does-not-exist")


@pytest.mark.parametrize("content", ["", "{not json", '{"version": "1.0"}', "[]"])
def test_load_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / TOKENIZER_FILE).write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)


def test_load_truncated_tokenizer_json(tmp_path, bpe):
    bpe.save(tmp_path)
    text = (tmp_path / TOKENIZER_FILE).read_text(encoding="utf-8")
    (tmp_path / TOKENIZER_FILE).write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(CheckpointError):
        Tokenizer.load(tmp_path)


def test_load_corrupt_tokenizer_config(tmp_path, bpe):
    bpe.save(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text("{oops", encoding="utf-8")
    with pytest.raises(CheckpointError, match=TOKENIZER_CONFIG_FILE):
        Tokenizer.load(tmp_path)


def test_load_config_naming_missing_token(tmp_path, bpe):
    bpe.save(tmp_path)
    config = json.loads((tmp_path / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
    config["eos_token"] = "</s>"
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="eos"):
        Tokenizer.load(tmp_path)

"""Text -> token shards (lmforge.data.shards)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import lmforge.data.shards as shards
import lmforge.data.sources as sources
from lmforge.data.shards import META_FILE, TokenData, prepare, token_dtype
from lmforge.errors import DataError
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

DOC_A = "First document.\nIt has two lines, é and 😀.\n" * 3
DOC_B = "Second one: ünïcödé text, 漢字, and more words to split.\n" * 4
RECORDS = [f"record {i}: {'ab' * (i % 5)} ü" for i in range(20)]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    corpus = [DOC_A, DOC_B, *RECORDS]
    dirs = {}
    for kind, size in (("char", None), ("bpe", 300)):
        folder = tmp_path_factory.mktemp(f"tok-{kind}")
        Tokenizer.train(corpus, kind=kind, vocab_size=size).save(folder)
        dirs[kind] = folder
    return dirs


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "corpus"
    folder.mkdir()
    a = folder / "a.txt"
    a.write_text(DOC_A, encoding="utf-8")
    b = folder / "b.jsonl"
    b.write_text("".join(json.dumps({"text": r}) + "\n" for r in RECORDS), encoding="utf-8")
    return {"folder": folder, "a": a, "b": b}


def read_split(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def docs(ids: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    """Decode a token stream, cutting it at every end-of-sequence token (the last part follows the last eos)."""
    parts, current = [], []
    for i in ids.tolist():
        if i == tokenizer.eos_id:
            parts.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    parts.append(tokenizer.decode(current))
    return parts


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


# ------------------------------------------------------------------ dtype
def test_token_dtype():
    assert token_dtype(100) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(200_000) == np.uint32


# ------------------------------------------------------------------ content
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_plain_text_file_decodes_back(tmp_path, tok_dirs, corpus, kind):
    out = tmp_path / "data"
    meta = prepare([corpus["a"]], tok_dirs[kind], out, val_fraction=0.1, progress=False)
    tok = Tokenizer.load(tok_dirs[kind])
    train, val = read_split(out, "train"), read_split(out, "val")
    data = DOC_A.encode()
    cut = int(len(data) * 0.9)
    while (data[cut] & 0xC0) == 0x80:
        cut += 1
    assert train[-1] == tok.eos_id and tok.eos_id not in train[:-1].tolist()  # each part ends its split
    assert tok.decode(train[:-1].tolist()) == data[:cut].decode()
    assert val[-1] == tok.eos_id
    assert tok.decode(val[:-1].tolist()) == data[cut:].decode()
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["reused"] is False


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_jsonl_records_each_followed_by_eos(tmp_path, tok_dirs, corpus, kind):
    out = tmp_path / "data"
    prepare([corpus["b"]], tok_dirs[kind], out, val_fraction=0.2, progress=False)
    tok = Tokenizer.load(tok_dirs[kind])
    train, val = read_split(out, "train"), read_split(out, "val")
    val_records = [r for i, r in enumerate(RECORDS) if (i + 1) % 5 == 0]  # floor((i+1)/5) > floor(i/5)
    train_records = [r for r in RECORDS if r not in val_records]
    assert train[-1] == tok.eos_id and val[-1] == tok.eos_id
    assert docs(train, tok) == [*train_records, ""]
    assert docs(val, tok) == [*val_records, ""]
    assert int((train == tok.eos_id).sum()) == len(train_records)
    assert int((val == tok.eos_id).sum()) == len(val_records)


def test_folder_input_and_meta(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    meta = prepare([corpus["folder"]], tok_dirs["char"], out, val_fraction=0.1, progress=False)
    tok = Tokenizer.load(tok_dirs["char"])
    on_disk = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    assert {k: v for k, v in meta.items() if k != "reused"} == on_disk
    assert on_disk["format"] == "lmforge-tokens-v1"
    assert on_disk["dtype"] == "uint16"
    assert on_disk["vocab_size"] == tok.vocab_size
    assert on_disk["eos_id"] == tok.eos_id
    assert on_disk["tokenizer_fingerprint"] == tok.fingerprint()
    assert on_disk["val_fraction"] == 0.1
    assert on_disk["text_field"] == "text"
    assert on_disk["inputs"] == [{"path": str(corpus["a"]), "bytes": corpus["a"].stat().st_size},
                                 {"path": str(corpus["b"]), "bytes": corpus["b"].stat().st_size}]
    assert isinstance(on_disk["fingerprint"], str) and on_disk["fingerprint"]
    for split in ("train", "val"):
        assert (out / f"{split}.bin").stat().st_size == on_disk[f"{split}_tokens"] * 2
    # the tokenizer travels with the data
    assert (out / TOKENIZER_FILE).is_file()
    assert Tokenizer.load(out).fingerprint() == tok.fingerprint()
    # every character of the corpus is there: text tokens = characters (char tokenizer)
    n_eos = len(RECORDS) + 2  # one per record, one after each split's part of the text file
    assert on_disk["train_tokens"] + on_disk["val_tokens"] == len(DOC_A) + sum(map(len, RECORDS)) + n_eos
    # no stray temporary files
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train.bin", "val.bin", META_FILE, TOKENIZER_FILE, "tokenizer_config.json"])


def test_token_data_reads_prepared_folder(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    meta = prepare([corpus["folder"]], tok_dirs["bpe"], out, progress=False)
    data = TokenData(out)
    assert data.train.dtype == np.uint16
    assert len(data.train) == meta["train_tokens"] and len(data.val) == meta["val_tokens"]
    assert np.array_equal(np.asarray(data.train), read_split(out, "train"))
    assert data.vocab_size == meta["vocab_size"]
    assert data.meta["fingerprint"] == meta["fingerprint"]
    assert data.tokenizer().fingerprint() == Tokenizer.load(tok_dirs["bpe"]).fingerprint()


def test_uint32_when_token_dtype_says_so(tmp_path, tok_dirs, corpus, monkeypatch):
    small = tmp_path / "small"
    prepare([corpus["folder"]], tok_dirs["char"], small, progress=False)
    monkeypatch.setattr(shards, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    big = tmp_path / "big"
    meta = prepare([corpus["folder"]], tok_dirs["char"], big, progress=False)
    assert meta["dtype"] == "uint32"
    for split in ("train", "val"):
        assert (big / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * 4
    data16, data32 = TokenData(small), TokenData(big)
    assert data32.train.dtype == np.uint32
    assert np.array_equal(np.asarray(data16.train, dtype=np.int64), np.asarray(data32.train, dtype=np.int64))
    assert np.array_equal(np.asarray(data16.val, dtype=np.int64), np.asarray(data32.val, dtype=np.int64))


# ------------------------------------------------------------------ idempotence
def test_second_prepare_is_reused_without_rewriting(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    first = prepare([corpus["folder"]], tok_dirs["char"], out, progress=False)
    before = mtimes(out)
    contents = {name: (out / name).read_bytes() for name in before}
    second = prepare([corpus["folder"]], tok_dirs["char"], out, progress=False)
    assert first["reused"] is False and second["reused"] is True
    assert {k: v for k, v in second.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}
    assert mtimes(out) == before
    assert {name: (out / name).read_bytes() for name in before} == contents


def test_changed_input_is_prepared_again(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    first = prepare([corpus["a"]], tok_dirs["char"], out, progress=False)
    corpus["a"].write_text(DOC_A + "more lines at the end.\n", encoding="utf-8")
    second = prepare([corpus["a"]], tok_dirs["char"], out, progress=False)
    assert second["reused"] is False
    assert second["fingerprint"] != first["fingerprint"]
    tok = Tokenizer.load(tok_dirs["char"])
    text = tok.decode(read_split(out, "train").tolist()) + tok.decode(read_split(out, "val").tolist())
    assert text == DOC_A + "more lines at the end.\n"


def test_touched_input_same_content_is_prepared_again(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    prepare([corpus["a"]], tok_dirs["char"], out, progress=False)
    stat = corpus["a"].stat()
    os.utime(corpus["a"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert prepare([corpus["a"]], tok_dirs["char"], out, progress=False)["reused"] is False


def test_other_settings_are_prepared_again(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    base = prepare([corpus["folder"]], tok_dirs["char"], out, val_fraction=0.1, progress=False)
    other_fraction = prepare([corpus["folder"]], tok_dirs["char"], out, val_fraction=0.2, progress=False)
    assert other_fraction["reused"] is False and other_fraction["val_tokens"] > base["val_tokens"]
    other_tok = prepare([corpus["folder"]], tok_dirs["bpe"], out, val_fraction=0.2, progress=False)
    assert other_tok["reused"] is False
    assert other_tok["tokenizer_fingerprint"] == Tokenizer.load(tok_dirs["bpe"]).fingerprint()
    assert Tokenizer.load(out).fingerprint() == other_tok["tokenizer_fingerprint"]
    other_inputs = prepare([corpus["a"]], tok_dirs["bpe"], out, val_fraction=0.2, progress=False)
    assert other_inputs["reused"] is False


def test_damaged_shards_are_prepared_again(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    first = prepare([corpus["folder"]], tok_dirs["char"], out, progress=False)
    good = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(good[:-2])
    second = prepare([corpus["folder"]], tok_dirs["char"], out, progress=False)
    assert second["reused"] is False
    assert (out / "train.bin").read_bytes() == good
    assert second["train_tokens"] == first["train_tokens"]


# ------------------------------------------------------------------ streaming
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_small_batches_give_the_same_result(tmp_path, tok_dirs, corpus, monkeypatch, kind):
    ref = tmp_path / "ref"
    prepare([corpus["folder"]], tok_dirs[kind], ref, progress=False)
    monkeypatch.setattr(shards, "BATCH_CHARS", 7)
    small = tmp_path / "small"
    prepare([corpus["folder"]], tok_dirs[kind], small, progress=False)
    for split in ("train", "val"):
        assert (small / f"{split}.bin").read_bytes() == (ref / f"{split}.bin").read_bytes()
    assert json.loads((small / META_FILE).read_text())["train_tokens"] == \
        json.loads((ref / META_FILE).read_text())["train_tokens"]


def test_small_chunks_and_subpieces_same_tokens_char(tmp_path, tok_dirs, corpus, monkeypatch):
    # a character tokenizer does not care where the text is cut: every size setting gives the same ids
    ref = tmp_path / "ref"
    prepare([corpus["folder"]], tok_dirs["char"], ref, progress=False)
    monkeypatch.setattr(shards, "BATCH_CHARS", 5)
    monkeypatch.setattr(shards, "SUBPIECE_CHARS", 8)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16)
    small = tmp_path / "small"
    prepare([corpus["folder"]], tok_dirs["char"], small, progress=False)
    for split in ("train", "val"):
        assert (small / f"{split}.bin").read_bytes() == (ref / f"{split}.bin").read_bytes()


def test_split_at_newlines_reassembles():
    text = "short\n" + "x" * 50 + "\n" + "line\n" * 30 + "tail without newline"
    for size in (1, 4, 10, 64, 1000):
        parts = shards._split_at_newlines(text, size)
        assert "".join(parts) == text
        assert all(parts)
        assert all(p.endswith("\n") for p in parts[:-1])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("contents", [[""], ["", ""], ['{"text": ""}\n{"text": ""}\n']])
def test_empty_corpus(tmp_path, tok_dirs, contents):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, content in enumerate(contents):
        suffix = ".jsonl" if content.startswith("{") else ".txt"
        (folder / f"f{i}{suffix}").write_text(content, encoding="utf-8")
    out = tmp_path / "data"
    with pytest.raises(DataError, match="empty"):
        prepare([folder], tok_dirs["char"], out, progress=False)
    assert not (out / META_FILE).exists()
    assert not (out / "train.bin").exists()
    if out.exists():
        assert list(out.iterdir()) == []  # no temporary shards left behind


def test_failed_prepare_invalidates_previous_preparation(tmp_path, tok_dirs, corpus):
    out = tmp_path / "data"
    prepare([corpus["a"]], tok_dirs["char"], out, progress=False)
    corpus["a"].write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prepare([corpus["a"]], tok_dirs["char"], out, progress=False)
    assert not (out / META_FILE).exists()
    with pytest.raises(DataError):
        TokenData(out)


def test_empty_validation_split(tmp_path, tok_dirs):
    f = tmp_path / "one.jsonl"
    f.write_text('{"text": "only one record"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="validation split is empty"):
        prepare([f], tok_dirs["char"], tmp_path / "data", val_fraction=0.1, progress=False)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2.0])
def test_bad_val_fraction(tmp_path, tok_dirs, corpus, fraction):
    with pytest.raises(DataError, match="val fraction"):
        prepare([corpus["a"]], tok_dirs["char"], tmp_path / "data", val_fraction=fraction, progress=False)


def test_missing_inputs(tmp_path, tok_dirs):
    with pytest.raises(DataError):
        prepare([tmp_path / "nope.txt"], tok_dirs["char"], tmp_path / "data", progress=False)


def test_token_data_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TokenData(tmp_path / "nowhere")


def test_token_data_folder_without_meta(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="prepare"):
        TokenData(tmp_path)


@pytest.mark.parametrize("damage", ["truncate_train", "delete_val", "bad_meta_json", "wrong_format", "no_dtype"])
def test_token_data_incomplete_folder(tmp_path, tok_dirs, corpus, damage):
    out = tmp_path / "data"
    prepare([corpus["folder"]], tok_dirs["char"], out, progress=False)
    TokenData(out)  # fine before the damage
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    if damage == "truncate_train":
        (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-1])
    elif damage == "delete_val":
        (out / "val.bin").unlink()
    elif damage == "bad_meta_json":
        (out / META_FILE).write_text("{", encoding="utf-8")
    elif damage == "wrong_format":
        (out / META_FILE).write_text(json.dumps({**meta, "format": "something-else"}), encoding="utf-8")
    else:
        del meta["dtype"]
        (out / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DataError):
        TokenData(out)

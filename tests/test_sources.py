"""Input files, streaming reads and the train/val split (lmforge.data.sources)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

import lmforge.data.sources as sources
from lmforge.data.sources import expand_inputs, iter_pieces, iter_texts, total_bytes
from lmforge.errors import DataError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def split_texts(pieces) -> dict[str, str]:
    out = {"train": "", "val": ""}
    for piece in pieces:
        out[piece.split] += piece.text
    return out


# ------------------------------------------------------------------ expand_inputs
def test_expand_single_file_any_suffix(tmp_path):
    f = write(tmp_path / "data.csv", "a,b\n")
    assert expand_inputs([f]) == [f]
    assert expand_inputs([str(f)]) == [f]


def test_expand_folder_recursive_text_suffixes_only(tmp_path):
    root = tmp_path / "corpus"
    wanted = [
        write(root / "a.txt", "a"),
        write(root / "b.md", "b"),
        write(root / "sub" / "c.jsonl", '{"text": "c"}\n'),
        write(root / "sub" / "deeper" / "d.py", "d = 1\n"),
        write(root / "sub" / "e.rst", "e"),
        write(root / "f.text", "f"),
    ]
    write(root / "image.png", "not text")
    write(root / "notes.csv", "x")
    write(root / "noext", "x")
    write(root / ".hidden.txt", "secret")
    write(root / ".git" / "config.txt", "secret")
    write(root / "sub" / ".cache" / "x.md", "secret")
    (root / "folder.txt").mkdir()  # a folder with a text suffix is not a file
    assert expand_inputs([root]) == sorted(wanted)


def test_expand_hidden_check_only_applies_below_the_given_folder(tmp_path):
    root = tmp_path / ".hidden_parent" / "corpus"
    f = write(root / "a.txt", "a")
    assert expand_inputs([root]) == [f]


def test_expand_glob(tmp_path):
    a = write(tmp_path / "a.txt", "a")
    b = write(tmp_path / "b.txt", "b")
    write(tmp_path / "c.md", "c")
    deep = write(tmp_path / "x" / "y" / "d.txt", "d")
    (tmp_path / "dir.txt").mkdir()
    assert expand_inputs([str(tmp_path / "*.txt")]) == [a, b]
    assert expand_inputs([str(tmp_path / "?.txt")]) == [a, b]
    assert expand_inputs([str(tmp_path / "[b].txt")]) == [b]
    assert expand_inputs([str(tmp_path / "**" / "*.txt")]) == sorted([a, b, deep])


def test_expand_existing_file_with_glob_characters_in_its_name(tmp_path):
    # a path that exists is taken literally, even when its name looks like a glob pattern
    f = write(tmp_path / "notes [draft].txt", "x")
    assert expand_inputs([f]) == [f]


def test_expand_keeps_order_and_removes_duplicates(tmp_path):
    a = write(tmp_path / "a.txt", "a")
    b = write(tmp_path / "b.txt", "b")
    assert expand_inputs([b, a, str(tmp_path / "*.txt"), b]) == [b, a]


def test_expand_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([tmp_path / "missing.txt"])


def test_expand_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        expand_inputs([str(tmp_path / "*.txt")])


def test_expand_folder_without_text_files(tmp_path):
    write(tmp_path / "only.png", "x")
    write(tmp_path / ".hidden.txt", "x")
    with pytest.raises(DataError, match="no text files"):
        expand_inputs([tmp_path])


def test_expand_nothing_given():
    with pytest.raises(DataError):
        expand_inputs([])


def test_total_bytes(tmp_path):
    a = write(tmp_path / "a.txt", "héllo")
    b = write(tmp_path / "b.txt", "😀")
    assert total_bytes([a, b]) == 6 + 4


# ------------------------------------------------------------------ plain text split
def expected_split_byte(data: bytes, fraction: float) -> int:
    pos = int(len(data) * (1 - fraction))
    while pos < len(data) and (data[pos] & 0xC0) == 0x80:
        pos += 1
    return pos


def test_plain_text_split_first_ninety_percent(tmp_path):
    text = "".join(f"line {i:03d}\n" for i in range(100))  # 900 ASCII bytes
    f = write(tmp_path / "a.txt", text)
    pieces = list(iter_pieces([f], 0.1))
    parts = split_texts(pieces)
    assert parts["train"] == text[:810]
    assert parts["val"] == text[810:]
    assert [p.split for p in pieces] == ["train", "val"]
    assert [p.end_of_document for p in pieces] == [True, True]  # each split's part ends a document
    assert sum(p.nbytes for p in pieces) == len(text.encode())


@pytest.mark.parametrize("char", ["é", "€", "😀"])
@pytest.mark.parametrize("shift", range(6))
def test_plain_text_split_snaps_to_character_boundary(tmp_path, char, shift):
    # 100 bytes in all; the cut at byte 90 falls at every position in and around a multi-byte character
    head = "a" * (88 - shift)
    tail_len = 100 - len(head.encode()) - 3 * len(char.encode())
    text = head + char * 3 + "z" * tail_len
    data = text.encode()
    assert len(data) == 100
    f = write(tmp_path / "a.txt", text)
    parts = split_texts(iter_pieces([f], 0.1))
    cut = expected_split_byte(data, 0.1)
    assert parts["train"].encode() == data[:cut]
    assert parts["val"].encode() == data[cut:]
    assert parts["train"] + parts["val"] == text
    assert "\ufffd" not in parts["train"] + parts["val"]


def test_plain_text_all_multibyte(tmp_path):
    text = "😀" * 37 + "漢字" * 11
    f = write(tmp_path / "a.txt", text)
    for fraction in (0.01, 0.1, 0.33, 0.5, 0.9):
        parts = split_texts(iter_pieces([f], fraction))
        assert parts["train"] + parts["val"] == text
        cut = expected_split_byte(text.encode(), fraction)
        assert len(parts["train"].encode()) == cut


def test_plain_text_no_val_fraction(tmp_path):
    f = write(tmp_path / "a.txt", "all of it\n")
    pieces = list(iter_pieces([f], 0.0))
    assert [(p.split, p.text, p.end_of_document) for p in pieces] == [("train", "all of it\n", True)]


def test_empty_plain_text_file_gives_no_text(tmp_path):
    f = write(tmp_path / "a.txt", "")
    assert "".join(p.text for p in iter_pieces([f], 0.1)) == ""


def test_several_files_in_order(tmp_path):
    a = write(tmp_path / "a.txt", "A" * 10)
    b = write(tmp_path / "b.txt", "B" * 20)
    pieces = list(iter_pieces([a, b], 0.5))
    assert [(p.split, p.text) for p in pieces] == [
        ("train", "A" * 5), ("val", "A" * 5), ("train", "B" * 10), ("val", "B" * 10)]
    assert list(iter_texts([a, b])) == ["A" * 10, "B" * 20]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_bad_val_fraction(tmp_path, fraction):
    f = write(tmp_path / "a.txt", "x")
    list(iter_pieces([f], fraction))  # fine
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(DataError):
            list(iter_pieces([f], bad))


# ------------------------------------------------------------------ chunked reading
def long_text() -> str:
    lines = [
        "short line\n",
        "x" * 200 + "\n",  # longer than a chunk
        "é" * 150 + "\n",  # two-byte characters, longer than a chunk
        "😀漢" * 40 + "\n",  # four- and three-byte characters
        "\n\n",
        "mixed " + "aé€😀" * 30,  # no final newline
        "\n" + "€" * 33 + "😀" * 17 + "b" * 3 + "\n",
        "".join(chr(c) for c in range(0x4E00, 0x4E00 + 120)),
    ]
    return "".join(lines)


@pytest.mark.parametrize("chunk", [16, 64, 100])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37])
def test_chunked_reading_reassembles_exact_text(tmp_path, monkeypatch, chunk, fraction):
    monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
    text = long_text()
    data = text.encode()
    assert len(data) > 10 * chunk
    f = write(tmp_path / "big.txt", text)
    pieces = list(iter_pieces([f], fraction))
    assert len(pieces) > 3  # really read in several chunks
    parts = split_texts(pieces)
    assert parts["train"] + parts["val"] == text
    cut = expected_split_byte(data, fraction)
    assert parts["train"].encode() == data[:cut]
    assert sum(p.nbytes for p in pieces) == len(data)
    for piece in pieces:
        assert piece.nbytes == len(piece.text.encode())
        assert piece.nbytes <= 2 * chunk + 4  # memory stays bounded (a chunk plus a carried remainder)
    # train pieces first, then val; the last piece of each split ends a document
    splits = [p.split for p in pieces]
    assert splits == sorted(splits, key=["train", "val"].index)
    last_of_split = [i == len(pieces) - 1 or pieces[i + 1].split != p.split for i, p in enumerate(pieces)]
    assert [p.end_of_document for p in pieces] == last_of_split


def test_chunks_are_cut_after_newlines(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    text = "".join(f"line number {i}\n" for i in range(40))
    f = write(tmp_path / "a.txt", text)
    pieces = list(iter_pieces([f], 0.0))
    assert "".join(p.text for p in pieces) == text
    assert all(p.text.endswith("\n") for p in pieces)


def test_chunked_reading_with_only_four_byte_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 7)  # not a multiple of the character size
    text = "".join(chr(0x1F600 + i % 50) for i in range(200))
    f = write(tmp_path / "a.txt", text)
    assert "".join(p.text for p in iter_pieces([f], 0.0)) == text
    assert split_texts(iter_pieces([f], 0.25))["val"] == text[150:]


# ------------------------------------------------------------------ JSONL
def write_jsonl(path: Path, records: list, blank_every: int = 0) -> Path:
    lines = []
    for i, record in enumerate(records):
        lines.append(json.dumps(record, ensure_ascii=False))
        if blank_every and i % blank_every == 0:
            lines.append("   ")
    return write(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.3, 0.5, 0.05])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 19, 40, 101])
def test_jsonl_val_records_exact_and_even(tmp_path, fraction, n):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(n)], blank_every=3)
    pieces = list(iter_pieces([f], fraction))
    assert [p.text for p in pieces] == [f"doc {i}" for i in range(n)]
    assert all(p.end_of_document for p in pieces)
    is_val = [p.split == "val" for p in pieces]
    exact = Fraction(str(fraction))
    assert sum(is_val) == math.floor(n * exact)
    # evenly: every prefix holds floor(k * f) val records
    for k in range(n + 1):
        assert sum(is_val[:k]) == math.floor(k * exact), k


@pytest.mark.parametrize("fraction", [0.29, 0.57, 0.58])
def test_jsonl_val_count_exact_for_decimal_fractions(tmp_path, fraction):
    # 100 * 0.29 is 28.999999999999996 in floating point; a 29% split of 100 records is still 29 records
    n = 100
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(n)])
    n_val = sum(p.split == "val" for p in iter_pieces([f], fraction))
    assert n_val == round(n * fraction)


def test_jsonl_other_text_field_and_nbytes(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"body": "héllo", "id": 1}, {"body": "😀"}])
    pieces = list(iter_pieces([f], 0.0, text_field="body"))
    assert [p.text for p in pieces] == ["héllo", "😀"]
    assert sum(p.nbytes for p in pieces) == f.stat().st_size
    assert list(iter_texts([f], text_field="body")) == ["héllo", "😀"]


def test_jsonl_mixed_with_plain_text(tmp_path):
    j = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    t = write(tmp_path / "b.txt", "plain")
    assert list(iter_texts([j, t])) == ["one", "two", "plain"]


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('{"text": "unterminated', "not valid JSON"),
    ('{"content": "no text field"}', "'text'"),
    ('["a", "list"]', "'text'"),
    ('"just a string"', "'text'"),
    ('{"text": 5}', "not a string"),
    ('{"text": null}', "not a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    f = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n' + bad_line + '\n{"text": "later"}\n')
    with pytest.raises(DataError) as info:
        list(iter_pieces([f], 0.1))
    text = str(info.value)
    assert str(f) in text
    assert "line 3" in text
    assert message in text


def test_jsonl_invalid_utf8(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="line 2"):
        list(iter_pieces([f], 0.1))


# ------------------------------------------------------------------ not UTF-8
def test_latin1_file_is_data_error(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_pieces([f], 0.1))


def test_invalid_byte_deep_in_a_chunked_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 32)
    f = tmp_path / "a.txt"
    f.write_bytes(b"good line\n" * 20 + b"bad \xff byte\n" + b"more\n" * 5)
    with pytest.raises(DataError, match=str(f.name)) as info:
        list(iter_pieces([f], 0.0))
    assert "byte 204" in str(info.value)  # the offset of the bad byte in the file


def test_invalid_utf8_in_val_part(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"a" * 95 + b"\xc3\x28" + b"bbb")
    with pytest.raises(DataError):
        list(iter_pieces([f], 0.1))

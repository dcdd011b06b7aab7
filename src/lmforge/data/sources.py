"""Where text comes from: files, folders and globs of plain text or JSONL, read as a stream.

A *document* is a plain-text file, or one record of a JSONL file (its ``text`` field by default).
Reading never holds a whole file in memory: plain text arrives in chunks of about a megabyte,
cut after a newline.

Train/validation split (deterministic, streaming-friendly):

* a plain-text file gives its first ``1 - val_fraction`` of bytes to train and the rest to val
  (for a single file such as tinyshakespeare this is the usual "first 90% / last 10%" split);
  each part ends a document in its split, so files never run into each other;
* in a JSONL file, record ``i`` goes to val when ``floor((i + 1) * f) > floor(i * f)``, which
  spreads exactly a fraction ``f`` of the records evenly through the file.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from lmforge.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl", ".py")
CHUNK_BYTES = 1 << 20


@dataclass
class Piece:
    """A stretch of text for one split; ``end_of_document`` marks the last piece of a document."""

    split: str  # "train" or "val"
    text: str
    end_of_document: bool
    nbytes: int  # bytes of the source consumed (for progress bars)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Resolve files, folders (their text files, recursively) and globs into a sorted file list."""
    files: list[Path] = []
    for item in inputs:
        item = str(item)
        if not Path(item).exists() and any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"no files match {item}")
            files.extend(p for p in matches if p.is_file())
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    if not files:
        raise DataError("no input files given")
    return list(dict.fromkeys(files))  # unique, order kept


def _utf8_boundary(data: bytes, pos: int) -> int:
    """The first position >= pos that does not fall inside a UTF-8 multi-byte character."""
    while pos < len(data) and (data[pos] & 0xC0) == 0x80:
        pos += 1
    return pos


def _decode(path: Path, data: bytes, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {offset + exc.start})") from None


def _read_chunks(path: Path, start: int, end: int) -> Iterator[tuple[str, int]]:
    """Decoded text of bytes [start, end) of ``path`` in ~1 MB chunks cut after a newline."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, remaining, carry = start, end - start, b""
        while remaining > 0:
            block = f.read(min(CHUNK_BYTES, remaining))
            if not block:
                break
            remaining -= len(block)
            data, carry = carry + block, b""
            if remaining > 0:  # cut after the last newline, or at least between two characters
                cut = data.rfind(b"\n") + 1 or _utf8_boundary(data, max(len(data) - 4, 0))
                data, carry = data[:cut], data[cut:]
            if data:
                yield _decode(path, data, offset), len(data)
                offset += len(data)
        if carry:
            yield _decode(path, carry, offset), len(carry)


def _plain_text_pieces(path: Path, val_fraction: float) -> Iterator[Piece]:
    size = path.stat().st_size
    split_at = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(split_at)
        split_at += _utf8_boundary(f.read(4), 0) if split_at < size else 0
    for split, start, end in (("train", 0, split_at), ("val", split_at, size)):
        previous: tuple[str, int] | None = None
        for chunk in _read_chunks(path, start, end):
            if previous is not None:
                yield Piece(split, previous[0], False, previous[1])
            previous = chunk
        if previous is not None:
            yield Piece(split, previous[0], True, previous[1])


def _jsonl_pieces(path: Path, val_fraction: float, text_field: str) -> Iterator[Piece]:
    fraction = Fraction(str(val_fraction))  # exact: 100 * 0.29 is 29, not 28.999...
    index = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}, line {line_number}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}, line {line_number}: no {text_field!r} field "
                                f"(choose the field with --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}, line {line_number}: field {text_field!r} is not a string")
            is_val = math.floor((index + 1) * fraction) > math.floor(index * fraction)
            index += 1
            yield Piece("val" if is_val else "train", text, True, len(raw))


def iter_pieces(files: list[Path], val_fraction: float = 0.0, text_field: str = "text") -> Iterator[Piece]:
    """Stream every input file as :class:`Piece` objects, assigning each to train or val."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val fraction must be in [0, 1), not {val_fraction}")
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_pieces(path, val_fraction, text_field)
        else:
            yield from _plain_text_pieces(path, val_fraction)


def iter_texts(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """All text of the inputs (both splits), e.g. to train a tokenizer."""
    for piece in iter_pieces(files, 0.0, text_field):
        if piece.text:
            yield piece.text


def total_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)

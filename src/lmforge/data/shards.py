"""Text -> token shards: ``train.bin`` and ``val.bin`` (flat memory-mapped arrays) plus ``meta.json``.

Layout of a prepared data directory::

    train.bin, val.bin        token ids, uint16 (vocabulary <= 65,536) or uint32, no header
    meta.json                 dtype, token counts, tokenizer fingerprint, inputs, settings
    tokenizer.json (+ config) the tokenizer the ids belong to

Each document is followed by the tokenizer's end-of-sequence token. Preparation streams: memory
use stays bounded (a few megabytes of text at a time) whatever the corpus size. It is idempotent:
when ``meta.json`` already records the same inputs (path, size, modification time), tokenizer and
settings, nothing is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.sources import Piece, expand_inputs, iter_pieces, total_bytes
from lmforge.errors import DataError
from lmforge.fileio import atomic_path, atomic_write_text
from lmforge.progress import progress_bar
from lmforge.tokenizer import Tokenizer

FORMAT = "lmforge-tokens-v1"
META_FILE = "meta.json"
SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # text encoded per call into the tokenizer (bounds memory: ~100 MB)
SUBPIECE_CHARS = 1 << 15  # pieces are cut at newlines into parts of about this size (parallelism)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _fingerprint(files: list[Path], tokenizer: Tokenizer, val_fraction: float, text_field: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, tokenizer.fingerprint(), val_fraction, text_field]).encode())
    for path in files:
        stat = path.stat()
        h.update(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


def _split_at_newlines(text: str, size: int = SUBPIECE_CHARS) -> list[str]:
    """Cut ``text`` into consecutive parts of about ``size`` characters, each ending at a newline."""
    parts, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        if cut <= start:
            cut = text.find("\n", start + size) + 1 or len(text)
        parts.append(text[start:cut])
        start = cut
    if start < len(text):
        parts.append(text[start:])
    return parts


def _encode_pieces(pieces: list[Piece], tokenizer: Tokenizer) -> dict[str, list[int]]:
    """Token ids per split for a batch of pieces, end-of-sequence appended after documents."""
    texts, owners = [], []
    for index, piece in enumerate(pieces):
        for part in _split_at_newlines(piece.text):
            texts.append(part)
            owners.append(index)
    encoded = tokenizer.encode_batch(texts) if texts else []
    ids: dict[str, list[int]] = {split: [] for split in SPLITS}
    position = 0
    for index, piece in enumerate(pieces):
        while position < len(owners) and owners[position] == index:
            ids[piece.split].extend(encoded[position])
            position += 1
        if piece.end_of_document:
            ids[piece.split].append(tokenizer.eos_id)
    return ids


def _batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare(inputs: list[str | Path], tokenizer_dir: str | Path, out: str | Path, val_fraction: float = 0.1,
            text_field: str = "text", progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out/{train,val}.bin``; returns the metadata (``reused`` tells
    whether an identical earlier preparation was kept)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    files = expand_inputs(inputs)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer in {tokenizer_dir} has no end-of-sequence token")
    out = Path(out)
    fingerprint = _fingerprint(files, tokenizer, val_fraction, text_field)
    existing = _read_meta_if_valid(out)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return {**existing, "reused": True}

    created = not out.exists()
    try:
        meta = _write_shards(files, tokenizer, out, val_fraction, text_field, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # leave nothing behind for a failed first preparation
        raise
    meta["fingerprint"] = fingerprint
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return {**meta, "reused": False}


def _write_shards(files: list[Path], tokenizer: Tokenizer, out: Path, val_fraction: float, text_field: str,
                  progress: bool) -> dict[str, Any]:
    """Tokenize into ``out``; returns the metadata (without fingerprint), ``meta.json`` not yet written."""
    dtype = token_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the old shards are invalid from here on
    counts = {split: 0 for split in SPLITS}
    text_tokens = 0
    bar = progress_bar(total=total_bytes(files), unit="B", unit_scale=True, desc="prepare", enabled=progress)
    with contextlib.ExitStack() as stack:
        tmp_paths = {split: stack.enter_context(atomic_path(out / f"{split}.bin")) for split in SPLITS}
        handles = {split: stack.enter_context(open(tmp_paths[split], "wb")) for split in SPLITS}
        for batch in _batches(iter_pieces(files, val_fraction, text_field)):
            for split, ids in _encode_pieces(batch, tokenizer).items():
                np.asarray(ids, dtype=dtype).tofile(handles[split])
                counts[split] += len(ids)
                text_tokens += len(ids) - sum(p.end_of_document for p in batch if p.split == split)
            bar.update(sum(p.nbytes for p in batch))
        if text_tokens <= 0:
            raise DataError(f"the corpus is empty: {len(files)} input file(s) hold no text")
        if counts["train"] == 0 or counts["val"] == 0:
            raise DataError(f"the {'validation' if counts['train'] else 'training'} split is empty: "
                            "give more text or another --val-fraction")
        bar.close()
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
    tokenizer.save(out)
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "val_fraction": val_fraction,
        "text_field": text_field,
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
    }


def _read_meta_if_valid(folder: Path) -> dict[str, Any] | None:
    """The metadata of a complete preparation in ``folder``, or None."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            if (folder / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


class TokenData:
    """A prepared data directory: memory-mapped ``train`` and ``val`` token arrays."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"data directory {self.folder} does not exist; make it with 'lmforge prepare'")
        meta = _read_meta_if_valid(self.folder)
        if meta is None or meta.get("format") != FORMAT:
            raise DataError(f"{self.folder} is not a complete prepared data directory "
                            f"(no valid {META_FILE}); run 'lmforge prepare' again")
        self.meta = meta
        dtype = np.dtype(meta["dtype"])
        self.train = np.memmap(self.folder / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(self.folder / "val.bin", dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.folder)

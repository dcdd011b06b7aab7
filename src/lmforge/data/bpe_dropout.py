"""BPE-dropout (Provilkov et al., 2020): training texts segmented with some merges skipped.

A BPE tokenizer splits a word the same way every time. With dropout ``p`` each merge is skipped with
probability ``p`` while a word is segmented, so the model sees a word in several splits (subword
regularisation, most useful with little data); held-out and generated text keep the usual split.

The tokenizers library draws the skips from an unseeded generator, so a run samples ``count``
segmentations of its training rows once, keeps them in its run directory (a resumed run reads them
back, so resuming stays exact) and epoch ``e`` trains on sample ``e mod count``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import models

from lmforge.errors import ConfigError
from lmforge.fileio import atomic_path
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Row = tuple[list[int], ...]  # a training row made only of token-id lists, e.g. (source ids, target ids)


@contextlib.contextmanager
def merge_dropout(tokenizer: Tokenizer, p: float) -> Iterator[None]:
    """Within the block, ``tokenizer`` skips each BPE merge with probability ``p``."""
    model = tokenizer.hf.model
    if not isinstance(model, models.BPE):
        raise ConfigError(f"data.bpe_dropout needs a BPE tokenizer; this one is {tokenizer.kind} "
                          f"({type(model).__name__})")
    before = model.dropout
    model.dropout = p
    try:
        yield
    finally:
        model.dropout = before


class SampledSegmentations(Sequence):
    """Training rows whose token ids change with the epoch.

    Indexing gives the usual segmentation (``base``; e.g. for lengths); :meth:`for_epoch` gives the
    rows an epoch trains on. The samples are kept as flat int32 arrays, one per field of a row.
    """

    def __init__(self, base: list[Row], ids: list[np.ndarray], offsets: list[np.ndarray], count: int):
        self.base, self.ids, self.offsets, self.count = base, ids, offsets, count

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):  # type: ignore[override]
        return self.base[index]

    def for_epoch(self, epoch: int) -> list[Row]:
        first = (epoch % self.count) * len(self.base)
        fields = [[ids[o[first + i]:o[first + i + 1]].tolist() for i in range(len(self.base))]
                  for ids, o in zip(self.ids, self.offsets)]
        return list(zip(*fields))

    def epoch_lengths(self, epoch: int) -> np.ndarray:
        """(N,) tokens of each row of :meth:`for_epoch` (all fields together)."""
        first = (epoch % self.count) * len(self.base)
        return sum(np.diff(o[first:first + len(self.base) + 1]) for o in self.offsets)

    @classmethod
    def sample(cls, base: list[Row], encode: Callable[[], list[Row]], tokenizer: Tokenizer, p: float,
               count: int) -> SampledSegmentations:
        """``count`` calls of ``encode`` (which re-encodes the training texts into rows like ``base``)
        with merges dropped with probability ``p``."""
        samples = []
        with merge_dropout(tokenizer, p):
            for _ in range(count):
                rows = encode()
                if len(rows) != len(base):
                    raise ValueError(f"re-encoding gave {len(rows)} rows for {len(base)}")
                samples.append(rows)
        width = len(base[0]) if base else 0
        ids, offsets = [], []
        for field in range(width):
            lists = [row[field] for rows in samples for row in rows]
            lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
            offsets.append(np.concatenate([[0], np.cumsum(lengths)]))
            ids.append(np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(lengths.sum())))
        return cls(base, ids, offsets, count)

    def save(self, path: Path, p: float) -> None:
        arrays = {f"ids{k}": a for k, a in enumerate(self.ids)} | {f"offsets{k}": a for k, a in enumerate(self.offsets)}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, p=p, count=self.count, rows=len(self.base), **arrays)

    @classmethod
    def load(cls, path: Path, base: list[Row], p: float, count: int) -> SampledSegmentations | None:
        """The samples saved at ``path``, or None when there are none for these rows, ``p`` and ``count``."""
        if not path.is_file():
            return None
        with np.load(path) as saved:
            if (float(saved["p"]), int(saved["count"]), int(saved["rows"])) != (p, count, len(base)):
                return None
            width = sum(1 for name in saved.files if name.startswith("ids"))
            return cls(base, [saved[f"ids{k}"] for k in range(width)], [saved[f"offsets{k}"] for k in range(width)],
                       count)


def sampled_segmentations(base: list[Row], encode: Callable[[], list[Row]], tokenizer: Tokenizer, p: float,
                          count: int, path: Path, resume: bool) -> SampledSegmentations:
    """The run's samples: read back from ``path`` when resuming, else sampled and saved there."""
    saved = SampledSegmentations.load(path, base, p, count) if resume else None
    if saved is not None:
        return saved
    if resume:
        log.warning("no BPE-dropout samples for this run in %s: sampling new ones (resuming is not exact)", path)
    sampled = SampledSegmentations.sample(base, encode, tokenizer, p, count)
    sampled.save(path, p)
    return sampled

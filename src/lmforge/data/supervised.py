"""Supervised fine-tuning data: encoded examples, a held-out split, truncation, packing and batches.

An example is ``(ids, labels)`` from :func:`lmforge.data.formats.encode_example`. A training row of
length L gives the model ``ids[:-1]`` and asks it to predict ``labels[1:]`` (prompt positions are
``IGNORE``). Rows are at most ``block_size + 1`` tokens: longer examples are truncated at the end,
and counted, never silently. With packing, examples are concatenated (in a shuffled order fixed by
the seed) and cut into rows of exactly ``block_size + 1`` tokens.

Batches are stateless, like pretraining windows: the examples of optimiser step ``s`` are a
function of ``(seed, s)`` (each epoch is a fresh permutation), so resuming needs no data position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.data.formats import IGNORE, iter_encoded, record_format
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def split_records(records: list[Any], val_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, val): record ``i`` is held out when ``floor((i + 1) f) > floor(i f)``, which spreads
    exactly a fraction ``f`` of the records evenly (the rule ``lmforge prepare`` uses for JSONL)."""
    f = Fraction(val_fraction).limit_denominator(10_000)
    train, val = [], []
    for i, record in enumerate(records):
        (val if (i + 1) * f // 1 > i * f // 1 else train).append(record)
    return train, val


@dataclass
class EncodedSet:
    """Encoded examples cut to the context, with what preparing them cost."""

    rows: list[tuple[list[int], list[int]]]
    truncated: int = 0       # examples cut at the end to fit the context
    dropped: int = 0         # examples left with nothing to learn after truncation
    tokens: int = 0          # tokens in rows


def encode_set(records: list[dict[str, Any]], fmt: str, tokenizer: Tokenizer, block_size: int,
               train_on_prompt: bool = False, packing: bool = False, seed: int = 0, name: str = "train") -> EncodedSet:
    """Encode, truncate (with a warning and a count) and optionally pack a list of records."""
    fmt = record_format(records, fmt)
    limit = block_size + 1
    examples = list(iter_encoded(records, fmt, tokenizer, train_on_prompt))
    out = EncodedSet([])
    if packing:
        order = np.random.default_rng([seed, 7]).permutation(len(examples))
        ids = [t for i in order for t in examples[i][0]]
        labels = [t for i in order for t in examples[i][1]]
        rows = [(ids[s:s + limit], labels[s:s + limit]) for s in range(0, len(ids) - limit + 1, limit)]
        if not rows:
            raise DataError(f"the {name} data has {len(ids)} tokens, fewer than one packed row of {limit}")
        out.rows = [r for r in rows if any(x != IGNORE for x in r[1][1:])]
        out.dropped = len(rows) - len(out.rows)
    else:
        for ids, labels in examples:
            if len(ids) > limit:
                ids, labels = ids[:limit], labels[:limit]
                out.truncated += 1
            if len(ids) < 2 or all(x == IGNORE for x in labels[1:]):
                out.dropped += 1
                continue
            out.rows.append((ids, labels))
    out.tokens = sum(len(ids) for ids, _ in out.rows)
    if out.truncated:
        log.warning("%d of %d %s examples are longer than the context (%d tokens) and were truncated at the end",
                    out.truncated, len(examples), name, block_size)
    if out.dropped:
        log.warning("%d %s %s had no response tokens left within the context and were dropped",
                    out.dropped, name, "rows" if packing else "examples")
    if not out.rows:
        raise DataError(f"no {name} example has anything to learn within the context of {block_size} tokens")
    return out


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (B, T) from rows of at most T + 1 tokens."""
    width = max(len(ids) for ids, _ in rows) - 1
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (ids, targets) in enumerate(rows):
        input_ids[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels[r, :len(ids) - 1] = torch.tensor(targets[1:])
    return {"input_ids": input_ids, "labels": labels}


GROUP_STEPS = 64  # steps' worth of rows sorted together by length_grouped_order


def length_grouped_order(order: np.ndarray, lengths: np.ndarray, per_step: int, rng: np.random.Generator) -> np.ndarray:
    """``order`` (a permutation of row indices) rearranged so that each step's ``per_step`` rows have
    similar lengths (Hugging Face's ``group_by_length``, fairseq's length buckets): every run of
    ``GROUP_STEPS * per_step`` rows is sorted by length, cut into steps, and the steps are shuffled with
    ``rng``. Less padding per batch, and still a random mix of lengths from step to step."""
    pieces = []
    for start in range(0, len(order), GROUP_STEPS * per_step):
        group = order[start:start + GROUP_STEPS * per_step]
        group = group[np.argsort(-lengths[group], kind="stable")]
        steps = [group[i:i + per_step] for i in range(0, len(group), per_step)]
        pieces.extend(steps[i] for i in rng.permutation(len(steps)))
    return np.concatenate(pieces) if pieces else order


class ShuffledBatches:
    """Micro-batches of rows made by ``collate(rows)``; which rows step ``s`` uses depends only on
    ``(seed, s)``, so resuming needs no data position.

    Each epoch is a permutation of the rows drawn from ``numpy.random.default_rng([seed, epoch])``;
    a step takes the next ``batch_size * world_size * grad_accum`` rows of that sequence, split by
    micro-batch and rank. With ``lengths`` (one per row) the permutation is rearranged by
    :func:`length_grouped_order`, so that a step's rows have similar lengths. Rows with methods
    ``for_epoch(epoch)`` and ``epoch_lengths(epoch)`` (e.g.
    :class:`lmforge.data.bpe_dropout.SampledSegmentations`) give each epoch its own version of the
    rows, grouped by their own lengths; the order still depends only on ``(seed, epoch)``.
    """

    def __init__(self, rows: list[Any], batch_size: int, grad_accum: int, seed: int,
                 collate: Callable[[list[Any]], dict[str, Tensor]], rank: int = 0, world_size: int = 1,
                 lengths: list[int] | None = None):
        self.rows, self.batch_size, self.grad_accum, self.seed = rows, batch_size, grad_accum, seed
        self.collate, self.rank, self.world_size = collate, rank, world_size
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        if self.lengths is not None and len(self.lengths) != len(rows):
            raise ValueError(f"{len(self.lengths)} lengths for {len(rows)} rows")
        self._epoch, self._order, self._rows = -1, np.empty(0, dtype=np.int64), rows

    def _row(self, position: int) -> Any:
        epoch, index = divmod(position, len(self.rows))
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.rows))
            rows, lengths = self.rows, self.lengths
            if hasattr(rows, "for_epoch"):
                rows, lengths = rows.for_epoch(epoch), None if lengths is None else rows.epoch_lengths(epoch)
            if lengths is not None:
                order = length_grouped_order(order, lengths, self.batch_size * self.world_size * self.grad_accum, rng)
            self._epoch, self._order, self._rows = epoch, order, rows
        return self._rows[self._order[index]]

    def batch(self, step: int, micro: int) -> dict[str, Tensor]:
        per_step = self.batch_size * self.world_size * self.grad_accum
        first = step * per_step + (micro * self.world_size + self.rank) * self.batch_size
        return self.collate([self._row(first + j) for j in range(self.batch_size)])

    def epochs(self, steps: int) -> float:
        """How many passes over the data ``steps`` optimiser steps make."""
        return steps * self.batch_size * self.world_size * self.grad_accum / len(self.rows)


class SupervisedBatches(ShuffledBatches):
    """:class:`ShuffledBatches` of encoded ``(ids, labels)`` rows, right-padded with ``pad_id``."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1, group_by_length: bool = False):
        super().__init__(rows, batch_size, grad_accum, seed, partial(collate, pad_id=pad_id), rank, world_size,
                         [len(ids) for ids, _ in rows] if group_by_length else None)

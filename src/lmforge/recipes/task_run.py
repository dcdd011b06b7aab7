"""What a task adds to the one training loop (:class:`TaskRun`), and the held-out split every task uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.config import FinetuneConfig
from lmforge.data.supervised import split_records
from lmforge.errors import DataError
from lmforge.training.loop import Objective, TrainResult


@dataclass
class TaskRun:
    """What a task adds to the loop."""

    model: nn.Module
    objective: Objective
    train_rows: list[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    evaluator: Callable[[nn.Module, bool], dict[str, float]]
    task_info: dict[str, Any]
    summary: str
    after: Callable[[TrainResult, nn.Module], None] | None = None  # e.g. tune thresholds on held-out data
    row_length: Callable[[Any], int] = lambda row: len(row[0])  # tokens of a row, for data.group_by_length
    encode_train: Callable[[], list[Any]] | None = None  # re-encode train_rows' texts (for data.bpe_dropout)
    extra: dict[str, Any] = field(default_factory=dict)


def held_out(config: FinetuneConfig, train_items: list[Any], val_items: list[Any] | None) -> tuple[list, list]:
    if val_items is None:
        train_items, val_items = split_records(train_items, config.data.val_fraction)
    if not val_items:
        raise DataError("no held-out examples: give data.val_path or a data.val_fraction > 0 with enough data")
    return train_items, val_items


def spread(items: list[Any], count: int | None) -> list[Any]:
    if count is None or count >= len(items):
        return items
    return [items[int(i * len(items) / count)] for i in range(count)]

"""Objectives: ``(model, batch) -> loss``. A recipe picks one; the loop never looks inside."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the labels that are not ``IGNORE_INDEX``.

    ``batch["input_ids"]`` and ``batch["labels"]`` are (B, T); labels are the inputs shifted by one.
    """
    logits = model(batch["input_ids"])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


def summed_causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of next-token cross-entropies, number of predicted tokens), for exact averages."""
    logits = model(batch["input_ids"])
    labels = batch["labels"].flatten()
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())

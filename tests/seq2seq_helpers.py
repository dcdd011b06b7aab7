"""Helpers shared by the encoder-decoder tests."""

from __future__ import annotations

import torch


def padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) ids and their (B, S) bool mask, True for real tokens."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
    return ids, mask

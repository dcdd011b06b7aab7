"""Fixed-length windows of a token array, for causal language modelling.

Training windows are drawn at random, but *statelessly*: the windows of optimiser step ``s`` are a
pure function of ``(seed, s)``. Resuming therefore needs no data position beyond the step, and the
windows of one step are split between micro-batches and ranks so that ``batch_size=12`` on one
process sees exactly the tokens that ``batch_size=6`` sees on each of two processes (or with
``grad_accum=2``).

Evaluation windows are fixed: non-overlapping, evenly spread over the split, the same every time.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lmforge.errors import DataError


class RandomWindows:
    """Random (input, target) windows of ``block_size`` tokens from ``tokens``.

    For step ``s``, ``grad_accum * world_size * batch_size`` start offsets are drawn from
    ``numpy.random.default_rng([seed, s])``; micro-batch ``m`` of rank ``r`` takes slice
    ``(m * world_size + r) * batch_size`` of them.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, grad_accum: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(tokens) < block_size + 1:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one window of "
                            f"{block_size + 1}; give more text or a smaller model.block_size")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.grad_accum, self.seed, self.rank, self.world_size = grad_accum, seed, rank, world_size
        self._offsets = np.arange(block_size + 1)

    def batch(self, step: int, micro: int) -> dict[str, Tensor]:
        """{"input_ids": (B, T), "labels": (B, T)} int64 tensors on the CPU."""
        rng = np.random.default_rng([self.seed, step])
        per_step = self.grad_accum * self.world_size * self.batch_size
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=per_step)
        first = (micro * self.world_size + self.rank) * self.batch_size
        rows = self.tokens[starts[first:first + self.batch_size, None] + self._offsets]  # (B, T + 1)
        rows = torch.from_numpy(rows.astype(np.int64))
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.batch_size * self.block_size


def eval_window_starts(n_tokens: int, block_size: int, count: int | None = None) -> np.ndarray:
    """Start offsets of fixed, non-overlapping evaluation windows (all of them, or ``count`` spread
    evenly). Window ``i`` predicts tokens ``start + 1 .. start + block_size``."""
    total = (n_tokens - 1) // block_size
    if total < 1:
        raise DataError(f"the validation split has {n_tokens} tokens, fewer than one window of "
                        f"{block_size + 1}; give more text or a larger --val-fraction")
    chosen = np.arange(total) if count is None or count >= total else np.linspace(0, total - 1, count).round()
    return chosen.astype(np.int64) * block_size


def eval_batches(tokens: np.ndarray, starts: np.ndarray, block_size: int, batch_size: int):
    """Yield {"input_ids", "labels"} batches of the given evaluation windows, in order."""
    offsets = np.arange(block_size + 1)
    for i in range(0, len(starts), batch_size):
        rows = torch.from_numpy(tokens[starts[i:i + batch_size, None] + offsets].astype(np.int64))
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

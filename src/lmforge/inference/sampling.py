"""Sampling settings and logits processors: repetition, presence and frequency penalties, temperature,
top-k, top-p, min-p.

Order, as in Hugging Face ``generate`` and vLLM: penalties (repetition, then presence/frequency), then
temperature, top-k, top-p, min-p, then a draw (or the arg-max when ``temperature == 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import SamplingConfig

__all__ = ["SamplingConfig", "apply_count_penalties", "apply_repetition_penalty", "filter_logits", "pick_next"]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty: for tokens already seen, divide positive logits and multiply negative ones.

    logits: (B, V) float; seen: (B, V) bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_count_penalties(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's presence and frequency penalties: subtract ``presence`` from the logit of every token that
    occurs in the completion so far and ``frequency`` times its number of occurrences.

    logits: (B, V) float; counts: (B, V) float, occurrences of each token in each row's completion.
    """
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def filter_logits(logits: Tensor, config: SamplingConfig) -> Tensor:
    """Temperature, then top-k, top-p and min-p filtering; removed tokens get -inf. (B, V) -> (B, V)."""
    logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if config.min_p is not None:
        probs = logits.softmax(-1)
        threshold = config.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def pick_next(logits: Tensor, config: SamplingConfig, seen: Tensor | None,
              generator: torch.Generator | None, counts: Tensor | None = None) -> Tensor:
    """The next token of every row: (B, V) logits -> (B,) ids.

    ``seen``: (B, V) bool, tokens of the prompt and completion (for the repetition penalty); ``counts``:
    (B, V) float, occurrences in the completion (for the presence and frequency penalties).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if counts is not None:
        logits = apply_count_penalties(logits, counts, config.presence_penalty, config.frequency_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

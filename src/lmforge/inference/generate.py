"""Token generation for a batch of prompts of different lengths, with a KV cache or a recurrent state.

:class:`TokenGenerator` owns what every model shares: sampling, the repetition, presence and
frequency penalties, end-of-sequence, :meth:`~TokenGenerator.finish` and ``max_new_tokens``. How the
model is run is a small strategy, chosen by the model's ``recurrent`` attribute:

- :class:`KVCacheDecoding` (transformers): prompts are left-padded to a common length; an attention
  mask hides the padding and position ids count only real tokens, so a prompt decodes the same alone
  or inside a batch. When a sequence reaches the model's context, the window slides: the cache is
  rebuilt from the last three quarters of the context and generation goes on.
- :class:`RecurrentDecoding` (LSTMs): each prompt is run alone (no padding ever enters the
  recurrence), the states are stacked into one batch, and each new token is one step of every row.
  The state carries the whole history, so there is no window and no limit past the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from lmforge.config import SamplingConfig
from lmforge.inference.sampling import pick_next
from lmforge.models.decoder import KVCache


class Decoding(Protocol):
    """How a model turns prompts, then one new token per row, into next-token logits."""

    def start(self) -> Tensor:
        """Run the prompts; returns the logits (B, V) of every row's first new token."""

    def step(self, next_ids: Tensor) -> Tensor:
        """Append one token per row, (B,); returns the logits (B, V) of the token after it."""


class KVCacheDecoding:
    """Transformer decoding: left-padded prompts, one shared KV cache, a sliding window at the context."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], pad_id: int, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.block_size = model.config.block_size
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, L - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, L - len(prompt):] = True
        self.history = ids.to(device)  # (B, S) every token so far, left-padded
        self.mask = mask.to(device)    # (B, S) True for real tokens
        self.window_padded = any(len(p) != L for p in prompts)  # is there padding in the cached window?
        self.positions: Tensor | None = None  # (B, 1) position of every row's last token
        self.cache: KVCache | None = None

    def _prefill(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Run a fresh cache over (B, S) tokens; returns the last logits (B, V)."""
        self.cache = KVCache.empty(self.model.config, ids.shape[0], self.block_size, self.device, self.dtype)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.window_padded = bool((~mask).any())
        logits = self.model(ids, position_ids=positions, attention_mask=mask if self.window_padded else None,
                            cache=self.cache, last_only=True)
        self.positions = mask.long().sum(-1, keepdim=True) - 1
        return logits[:, -1]

    def start(self) -> Tensor:
        return self._prefill(self.history, self.mask)

    def step(self, next_ids: Tensor) -> Tensor:
        # Finished rows keep decoding garbage that nobody reads; marking it real keeps the
        # attention mask (and so the arithmetic of the other rows) unchanged.
        self.history = torch.cat([self.history, next_ids[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if self.cache.length >= self.block_size:  # slide the window: rebuild from the recent tokens
            keep = max(1, self.block_size * 3 // 4)
            return self._prefill(self.history[:, -keep:], self.mask[:, -keep:])
        self.positions = self.positions + 1
        attention = self.mask[:, -(self.cache.length + 1):] if self.window_padded else None
        return self.model(next_ids[:, None], position_ids=self.positions, attention_mask=attention,
                          cache=self.cache, last_only=True)[:, -1]


class RecurrentDecoding:
    """Recurrent decoding (a model with ``recurrent = True``): every prompt is run alone from the zero
    state, the final states (h, c), each (L, 1, C), are stacked into (L, B, C), and each new token is
    one step of the whole batch. Identical prompts (several samples of one prompt) are run once."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], device: torch.device):
        self.model, self.prompts, self.device = model, prompts, device
        self.state: tuple[Tensor, ...] | None = None

    def start(self) -> Tensor:
        done: dict[tuple[int, ...], tuple[Tensor, tuple[Tensor, ...]]] = {}
        for prompt in self.prompts:
            if tuple(prompt) not in done:
                ids = torch.tensor([prompt], dtype=torch.long, device=self.device)  # (1, T)
                done[tuple(prompt)] = self.model(ids, return_state=True, last_only=True)
        rows = [done[tuple(prompt)] for prompt in self.prompts]
        logits = torch.cat([row_logits[:, -1] for row_logits, _ in rows])  # (B, V)
        self.state = tuple(torch.cat(parts, dim=1) for parts in zip(*(state for _, state in rows)))
        return logits

    def step(self, next_ids: Tensor) -> Tensor:
        logits, self.state = self.model(next_ids[:, None], state=self.state, return_state=True, last_only=True)
        return logits[:, -1]


class TokenGenerator:
    """Iterate to get, step by step, the next token of every row: a (B,) tensor.

    Rows that have finished (end-of-sequence, or marked with :meth:`finish` by the caller, e.g. on a
    stop string) get ``pad_id`` and are skipped in later steps' results. Iteration ends when every
    row has finished or ``max_new_tokens`` steps were taken. Prompts may be as long as the model's
    ``block_size``; a recurrent model (``model.recurrent``) then generates without any window.
    """

    def __init__(self, model: nn.Module, prompts: list[list[int]], sampling: SamplingConfig, eos_id: int | None,
                 pad_id: int = 0, dtype: torch.dtype | None = None):
        self.model, self.sampling, self.eos_id, self.pad_id = model, sampling, eos_id, pad_id
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        if max(lengths) > self.block_size:
            raise ValueError(f"a prompt of {max(lengths)} tokens exceeds the context of {self.block_size}")
        self.decoding: Decoding
        if getattr(model, "recurrent", False):
            self.decoding = RecurrentDecoding(model, prompts, self.device)
        else:
            dtype = dtype or next(model.parameters()).dtype
            self.decoding = KVCacheDecoding(model, prompts, pad_id, self.device, dtype)
        B = len(prompts)
        self.finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.seen = None  # (B, V) tokens of the prompt and completion
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros((B, self.vocab_size), dtype=torch.bool, device=self.device)
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.tensor(prompt, dtype=torch.long, device=self.device)] = True
        self.counts = None  # (B, V) occurrences of each token in the completion
        if sampling.counts_tokens:
            self.counts = torch.zeros((B, self.vocab_size), dtype=torch.float32, device=self.device)
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

    def finish(self, rows: Tensor | list[int]) -> None:
        """Mark rows as done (their later tokens are ignored)."""
        self.finished[torch.as_tensor(rows, device=self.device, dtype=torch.long)] = True

    @torch.inference_mode()
    def __iter__(self) -> Iterator[Tensor]:
        next_ids = None
        for _ in range(self.sampling.max_new_tokens):
            if bool(self.finished.all()):
                return
            logits = self.decoding.start() if next_ids is None else self.decoding.step(next_ids)  # (B, V)
            next_ids = pick_next(logits, self.sampling, self.seen, self.generator, self.counts)  # (B,)
            next_ids = next_ids.masked_fill(self.finished, self.pad_id)
            alive = ~self.finished
            yield next_ids
            if self.eos_id is not None:
                self.finished |= next_ids == self.eos_id
            if self.seen is not None:
                self.seen[alive, next_ids[alive]] = True
            if self.counts is not None:
                self.counts[alive, next_ids[alive]] += 1

"""Token generation with a KV cache, for a batch of prompts of different lengths.

Prompts are left-padded to a common length; an attention mask hides the padding and position ids
count only real tokens, so a prompt decodes the same alone or inside a batch. When a sequence
reaches the model's context, the window slides: the cache is rebuilt from the last three quarters
of the context and generation goes on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lmforge.config import SamplingConfig
from lmforge.inference.sampling import pick_next
from lmforge.models.decoder import KVCache


class TokenGenerator:
    """Iterate to get, step by step, the next token of every row: a (B,) tensor.

    Rows that have finished (end-of-sequence, or marked with :meth:`finish` by the caller, e.g. on a
    stop string) get ``pad_id`` and are skipped in later steps' results. Iteration ends when every
    row has finished or ``max_new_tokens`` steps were taken.
    """

    def __init__(self, model: nn.Module, prompts: list[list[int]], sampling: SamplingConfig, eos_id: int | None,
                 pad_id: int = 0, dtype: torch.dtype | None = None):
        self.model, self.sampling, self.eos_id, self.pad_id = model, sampling, eos_id, pad_id
        self.device = next(model.parameters()).device
        self.dtype = dtype or next(model.parameters()).dtype
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        if max(lengths) > self.block_size:
            raise ValueError(f"a prompt of {max(lengths)} tokens exceeds the context of {self.block_size}")
        B, L = len(prompts), max(lengths)
        self.padded = min(lengths) != L
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, L - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, L - len(prompt):] = True
        self.history = ids.to(self.device)  # (B, S) every token so far, left-padded
        self.mask = mask.to(self.device)    # (B, S) True for real tokens
        self.finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.seen = None
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros((B, self.vocab_size), dtype=torch.bool, device=self.device)
            self.seen.scatter_(1, self.history, self.mask)
        self.counts = None  # (B, V) occurrences of each token in the completion
        if sampling.counts_tokens:
            self.counts = torch.zeros((B, self.vocab_size), dtype=torch.float32, device=self.device)
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

    def finish(self, rows: Tensor | list[int]) -> None:
        """Mark rows as done (their later tokens are ignored)."""
        self.finished[torch.as_tensor(rows, device=self.device, dtype=torch.long)] = True

    def _prefill(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, KVCache]:
        """Run a fresh cache over (B, S) tokens; returns the last logits (B, V) and the cache."""
        cache = KVCache.empty(self.model.config, ids.shape[0], self.block_size, self.device, self.dtype)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        padded = bool((~mask).any())
        logits = self.model(ids, position_ids=positions, attention_mask=mask if padded else None,
                            cache=cache, last_only=True)
        return logits[:, -1], cache

    @torch.inference_mode()
    def __iter__(self) -> Iterator[Tensor]:
        logits, cache = self._prefill(self.history, self.mask)
        positions = self.mask.long().sum(-1, keepdim=True) - 1  # (B, 1) last real position
        window_padded = self.padded
        for _ in range(self.sampling.max_new_tokens):
            if bool(self.finished.all()):
                return
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
            # Finished rows keep decoding garbage that nobody reads; marking it real keeps the
            # attention mask (and so the arithmetic of the other rows) unchanged.
            self.history = torch.cat([self.history, next_ids[:, None]], dim=1)
            self.mask = torch.cat([self.mask, torch.ones_like(alive)[:, None]], dim=1)
            if cache.length >= self.block_size:  # slide the window: rebuild from the recent tokens
                keep = max(1, self.block_size * 3 // 4)
                window_mask = self.mask[:, -keep:]
                logits, cache = self._prefill(self.history[:, -keep:], window_mask)
                positions = window_mask.long().sum(-1, keepdim=True) - 1
                window_padded = bool((~window_mask).any())
                continue
            positions = positions + 1
            attention = self.mask[:, -(cache.length + 1):] if window_padded else None
            logits = self.model(next_ids[:, None], position_ids=positions, attention_mask=attention,
                                cache=cache, last_only=True)[:, -1]

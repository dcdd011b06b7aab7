"""Greedy and sampled generation for encoder-decoder models (:class:`~lmforge.models.seq2seq.Seq2SeqLM`).

The sources are right-padded and encoded once; the decoder then starts every row from bos and takes
one token per step through a :class:`~lmforge.models.seq2seq.Seq2SeqCache`. A row that produces eos
leaves the batch (its cache rows are dropped), so the remaining rows decode faster.

:class:`Seq2SeqDecoding` is the step interface (``start``, ``step``, ``select``) shared with beam
search (:mod:`lmforge.inference.beam`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.config import SamplingConfig
from lmforge.inference.sampling import pick_next


class Seq2SeqDecoding:
    """Encode sources once, then decode one target token per row.

    Rows start as one per source, in order; :meth:`select` reorders, repeats or drops them (beam
    search expands each source into its beams this way). ``max_new_tokens`` bounds the tokens fed
    to the decoder (bos and all but the last generated one), at most the model's ``block_size``.
    """

    def __init__(self, model: nn.Module, sources: list[list[int]], bos_id: int, pad_id: int,
                 max_new_tokens: int):
        self.model, self.bos_id = model, bos_id
        block_size = model.config.block_size
        if not sources or min(map(len, sources)) < 1:
            raise ValueError("every source needs at least one token")
        if max(map(len, sources)) > block_size:
            raise ValueError(f"a source of {max(map(len, sources))} tokens exceeds the context of {block_size}")
        self.device = device = next(model.parameters()).device
        width = max(map(len, sources))
        ids = torch.full((len(sources), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sources), width), dtype=torch.bool)
        for row, source in enumerate(sources):  # right padding; the mask hides it
            ids[row, :len(source)] = torch.tensor(source, dtype=torch.long)
            mask[row, :len(source)] = True
        ids, mask = ids.to(device), mask.to(device)
        memory = model.encode(ids, mask)  # (B, S, C)
        self.cache = model.new_cache(memory, mask, max_len=max(1, min(max_new_tokens, block_size)), source_ids=ids)

    @property
    def rows(self) -> int:
        return self.cache.batch_size

    def start(self) -> Tensor:
        """Feed bos to every row; returns the logits (rows, V) of the first target token."""
        return self.step(torch.full((self.rows,), self.bos_id, dtype=torch.long, device=self.device))

    def step(self, next_ids: Tensor) -> Tensor:
        """Append one token per row, (rows,); returns the logits (rows, V) of the token after it."""
        return self.model.decode(next_ids[:, None], cache=self.cache, last_only=True)[:, -1]

    def select(self, rows: Tensor) -> None:
        """Keep ``rows`` (new row i is old row ``rows[i]``); they may repeat or be left out."""
        self.cache.select(rows.to(self.device))


@torch.inference_mode()
def generate_seq2seq(model: nn.Module, sources: list[list[int]], sampling: SamplingConfig, bos_id: int,
                     eos_id: int | None, pad_id: int = 0) -> list[list[int]]:
    """Target ids for every source: greedy when ``sampling.temperature == 0``, else sampled.

    Every target starts from ``bos_id`` and ends before ``eos_id`` (neither is in the output) or after
    ``sampling.max_new_tokens`` tokens (at most the model's ``block_size``). ``sampling`` supplies
    temperature, top-k/top-p/min-p, the repetition penalty (over the target so far), the presence and
    frequency penalties, ``ignore_eos`` and ``seed``; ``num_samples`` and ``stop`` are the caller's.
    A source decodes greedily to the same ids alone or padded inside a batch.
    """
    max_new_tokens = min(sampling.max_new_tokens, model.config.block_size)
    outputs: list[list[int]] = [[] for _ in sources]
    if max_new_tokens == 0:
        return outputs
    decoding = Seq2SeqDecoding(model, sources, bos_id, pad_id, max_new_tokens)
    device = decoding.device
    V = model.config.vocab_size
    active = torch.arange(len(sources), device=device)  # (B',) the source of every row still decoding
    seen = torch.zeros((len(sources), V), dtype=torch.bool, device=device) \
        if sampling.repetition_penalty != 1.0 else None  # (B', V) tokens of each target so far
    counts = torch.zeros((len(sources), V), dtype=torch.float32, device=device) \
        if sampling.counts_tokens else None              # (B', V) occurrences in each target so far
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stop_at_eos = eos_id is not None and not sampling.ignore_eos

    logits = decoding.start()  # (B', V)
    for step in range(max_new_tokens):
        next_ids = pick_next(logits, sampling, seen, generator, counts)  # (B',)
        ended = next_ids == eos_id if stop_at_eos else torch.zeros_like(next_ids, dtype=torch.bool)
        for source, token, end in zip(active.tolist(), next_ids.tolist(), ended.tolist()):
            if not end:
                outputs[source].append(token)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):  # drop finished rows from the batch and the cache
            keep = (~ended).nonzero().squeeze(1)  # (B'',)
            decoding.select(keep)
            active, next_ids = active[keep], next_ids[keep]
            seen = seen[keep] if seen is not None else None
            counts = counts[keep] if counts is not None else None
        rows = torch.arange(len(next_ids), device=device)
        if seen is not None:
            seen[rows, next_ids] = True
        if counts is not None:
            counts[rows, next_ids] += 1
        logits = decoding.step(next_ids)
    return outputs

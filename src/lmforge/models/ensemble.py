"""An ensemble of encoder-decoders decoded as one model: the mean of their next-token probabilities.

Translation systems have long combined independently trained models this way (averaging the members'
probabilities at every step of the search); two members usually gain a BLEU point or more over either.
:class:`Seq2SeqEnsemble` has the interface of :class:`~lmforge.models.seq2seq.Seq2SeqLM` that training
evaluation and decoding use (``forward``, ``encode``, ``new_cache``, ``decode``), so greedy, sampled
and beam-search decoding run on it unchanged. It returns log-probabilities,

    log( mean over members m of softmax(logits_m) )        (B, T, V)

which a log-softmax (what losses, sampling and beam search take) leaves as they are. The members must
share a vocabulary (the same tokenizer); they may differ in everything else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.models.seq2seq import Seq2SeqCache, Seq2SeqLM


def mean_probabilities(outputs: Sequence[Tensor]) -> Tensor:
    """Log of the mean of the members' softmax: M tensors (..., V) of logits -> (..., V) float32."""
    logprobs = torch.stack([output.float().log_softmax(-1) for output in outputs])  # (M, ..., V)
    return logprobs.logsumexp(0) - math.log(len(outputs))


@dataclass
class EnsembleCache:
    """One :class:`~lmforge.models.seq2seq.Seq2SeqCache` per member, moved together."""

    members: list[Seq2SeqCache]

    @property
    def length(self) -> int:
        return self.members[0].length

    @property
    def batch_size(self) -> int:
        return self.members[0].batch_size

    def select(self, rows: Tensor) -> None:
        """Keep batch ``rows`` (B',) in every member's cache (see :meth:`Seq2SeqCache.select`)."""
        for cache in self.members:
            cache.select(rows)


class Seq2SeqEnsemble(nn.Module):
    """Encoder-decoders with one vocabulary, decoded together. ``config`` is the first member's, with
    the smallest ``block_size`` of all."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two models")
        if not all(isinstance(m, Seq2SeqLM) for m in members):
            raise ValueError("only encoder-decoders (seq2seq checkpoints) can be ensembled")
        vocab_sizes = {m.config.vocab_size for m in members}
        if len(vocab_sizes) > 1:
            raise ValueError(f"the members' vocabularies differ ({', '.join(map(str, sorted(vocab_sizes)))} tokens)")
        self.members = nn.ModuleList(members)
        self.config = dataclasses.replace(members[0].config, block_size=min(m.config.block_size for m in members))

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor) -> Tensor:
        """Teacher-forced log-probabilities (B, T, V); arguments as :meth:`Seq2SeqLM.forward`."""
        return mean_probabilities([m(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
                                   for m in self.members])

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
        """Every member's encoder output, (B, S, C_m) each."""
        return [m.encode(input_ids, attention_mask) for m in self.members]

    def new_cache(self, memory: list[Tensor], attention_mask: Tensor | None = None, max_len: int | None = None,
                  source_ids: Tensor | None = None) -> EnsembleCache:
        """Every member's decoding cache for its encoder output (``memory`` from :meth:`encode`)."""
        return EnsembleCache([m.new_cache(mem, attention_mask, max_len, source_ids)
                              for m, mem in zip(self.members, memory)])

    def decode(self, decoder_input_ids: Tensor, memory: list[Tensor] | None = None,
               attention_mask: Tensor | None = None, *, cache: EnsembleCache | None = None,
               last_only: bool = False, source_ids: Tensor | None = None) -> Tensor:
        """Next-token log-probabilities (B, T or 1, V); arguments as :meth:`Seq2SeqLM.decode`, with
        ``memory`` and ``cache`` those of :meth:`encode` and :meth:`new_cache`."""
        memories = memory if memory is not None else [None] * len(self.members)
        caches = cache.members if cache is not None else [None] * len(self.members)
        return mean_probabilities([
            m.decode(decoder_input_ids, mem, attention_mask, cache=c, last_only=last_only, source_ids=source_ids)
            for m, mem, c in zip(self.members, memories, caches)])

    def num_parameters(self, non_embedding: bool = False) -> int:
        return sum(m.num_parameters(non_embedding) for m in self.members)

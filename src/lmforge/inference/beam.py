"""Batched beam search, with the semantics of Hugging Face ``generate(num_beams=...)``.

Every source keeps ``beam_size`` live beams. At each step, every beam's log-probabilities of the next
token are added to its running sum; of the ``2 * beam_size`` best (beam, token) candidates of a source,
an end-of-sequence among the first ``beam_size`` finishes a hypothesis, and the first ``beam_size``
other candidates become the next beams. A finished hypothesis scores

    sum of its token log-probabilities (eos included) / length ** length_penalty

with ``length`` its number of tokens, eos included; so ``length_penalty`` > 0 favours longer outputs
and < 0 shorter ones. A source is done when it has ``beam_size`` finished hypotheses and either
``early_stopping`` is set or no live beam can still beat the worst of them (judged, as Hugging Face
does, by the best live beam's score at its current length). Beams that run out of ``max_new_tokens``
join the hypotheses unfinished. ``no_repeat_ngram_size`` = n forbids any n-gram from occurring twice
in a hypothesis (counting the decoder's start token before it, as Hugging Face does). tests/test_beam.py
checks that hypotheses and scores are those of transformers' ``generate`` on the same model.

The search runs on a small step interface (:class:`BeamDecoding`): any model that can feed one token
per row and reorder its rows can be searched; :func:`beam_search` does it for an encoder-decoder.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from lmforge.inference.seq2seq_decoding import Seq2SeqDecoding


class BeamDecoding(Protocol):
    """A batch of decoder states, one per row (:class:`~lmforge.inference.seq2seq_decoding.Seq2SeqDecoding` is one)."""

    def start(self) -> Tensor:
        """Logits (rows, V) of every row's first new token."""

    def step(self, next_ids: Tensor) -> Tensor:
        """Append one token per row, (rows,); returns the logits (rows, V) of the token after it."""

    def select(self, rows: Tensor) -> None:
        """Keep ``rows`` (new row i is old row ``rows[i]``); they may repeat or be left out."""


class Hypotheses:
    """The ``beam_size`` best finished hypotheses of one source, best first."""

    def __init__(self, beam_size: int, length_penalty: float):
        self.beam_size, self.length_penalty = beam_size, length_penalty
        self.items: list[tuple[float, list[int]]] = []  # (score, token ids)

    def add(self, ids: list[int], sum_logprobs: float, length: int) -> None:
        """Keep ``ids`` if it is among the best; ``length`` counts its scored tokens (eos included)."""
        self.items.append((sum_logprobs / length ** self.length_penalty, ids))
        self.items.sort(key=lambda item: -item[0])  # stable: an earlier hypothesis wins a tie
        del self.items[self.beam_size:]

    def is_done(self, best_live_sum: float, length: int, early_stopping: bool) -> bool:
        """Whether the search of this source is over, given the best live beam's sum of log-probs
        after ``length`` tokens."""
        if len(self.items) < self.beam_size:
            return False
        return early_stopping or self.items[-1][0] >= best_live_sum / length ** self.length_penalty


def repeated_ngram_tokens(ids: list[int], n: int) -> list[int]:
    """The tokens that would complete, after ``ids``, an n-gram already in ``ids``."""
    if len(ids) < n - 1:
        return []
    prefix = ids[len(ids) - n + 1:]  # the last n - 1 tokens (none for n = 1: every seen token is banned)
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i:i + n - 1] == prefix]


def search(decoding: BeamDecoding, num_sources: int, *, beam_size: int, max_new_tokens: int, eos_id: int,
           length_penalty: float = 1.0, early_stopping: bool = True, no_repeat_ngram_size: int = 0,
           context: list[int] | None = None, num_return_sequences: int = 1) -> list[tuple[list[int], float]]:
    """Beam search over ``decoding``, which starts with one row per source; returns the best
    hypothesis of every source: (token ids without eos, score). See the module for the semantics.

    ``context``: tokens before the first new one that n-gram blocking counts too (the decoder's
    start token of an encoder-decoder). ``num_return_sequences`` n <= ``beam_size``: the n best
    hypotheses of every source instead, best first, source after source (n * sources items, as Hugging
    Face's ``generate``).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, not {beam_size}")
    if not 1 <= num_return_sequences <= beam_size:
        raise ValueError(f"num_return_sequences must be between 1 and beam_size ({beam_size}), "
                         f"not {num_return_sequences}")
    if max_new_tokens < 1:
        return [([], 0.0) for _ in range(num_sources * num_return_sequences)]
    K = beam_size
    finished = [Hypotheses(K, length_penalty) for _ in range(num_sources)]
    live = list(range(num_sources))  # sources still searching; live[i]'s beams are rows [i*K, (i+1)*K)
    beams: list[list[int]] = [[] for _ in range(num_sources * K)]  # generated ids of every row
    decoding.select(torch.arange(num_sources).repeat_interleave(K))  # K copies of every source's state
    logits = decoding.start()  # (B*K, V)
    # (B, K) running sums of log-probs; all beams start equal, so only the first one may spread at first
    scores = torch.zeros(num_sources, K, device=logits.device)
    scores[:, 1:] = -1e9
    for step in range(max_new_tokens):
        logprobs = logits.float().log_softmax(-1)  # (B'*K, V)
        if no_repeat_ngram_size:
            for row, ids in enumerate(beams):
                logprobs[row, repeated_ngram_tokens((context or []) + ids, no_repeat_ngram_size)] = float("-inf")
        V = logprobs.shape[-1]
        totals = (scores.view(-1, 1) + logprobs).view(len(live), K * V)  # (B', K*V) sums if extended
        top_sums, top = totals.topk(2 * K, dim=1)                       # (B', 2K), best first
        top_sums, top_rows, top_tokens = top_sums.tolist(), (top // V).tolist(), (top % V).tolist()

        still, rows, tokens, sums = [], [], [], []  # the next beams: old row, new token, new sum
        for i, source in enumerate(live):
            chosen: list[tuple[int, int, float]] = []
            for rank in range(2 * K):
                row, token, total = i * K + top_rows[i][rank], top_tokens[i][rank], top_sums[i][rank]
                if token == eos_id:
                    if rank < K:  # an eos below the top K candidates is not a hypothesis
                        finished[source].add(beams[row], total, len(beams[row]) + 1)
                    continue
                chosen.append((row, token, total))
                if len(chosen) == K:
                    break
            if finished[source].is_done(chosen[0][2], step + 1, early_stopping):
                continue  # this source's live beams are dropped
            still.append(source)
            for row, token, total in chosen:
                rows.append(row)
                tokens.append(token)
                sums.append(total)
        beams = [beams[row] + [token] for row, token in zip(rows, tokens)]
        live = still
        scores = torch.tensor(sums, device=logits.device).view(len(live), K)
        if not live or step == max_new_tokens - 1:
            break
        decoding.select(torch.tensor(rows, device=logits.device))
        logits = decoding.step(torch.tensor(tokens, device=logits.device))

    for i, source in enumerate(live):  # out of tokens: the live beams are hypotheses too, without eos
        for k in range(K):
            ids = beams[i * K + k]
            finished[source].add(ids, scores[i, k].item(), len(ids))
    return [(ids, score) for hypotheses in finished for score, ids in hypotheses.items[:num_return_sequences]]


@torch.inference_mode()
def beam_search(model: nn.Module, sources: list[list[int]], *, beam_size: int, max_new_tokens: int,
                length_penalty: float = 1.0, early_stopping: bool = True, no_repeat_ngram_size: int = 0,
                bos_id: int, eos_id: int, pad_id: int, num_return_sequences: int = 1) -> list[tuple[list[int], float]]:
    """The best target of every source of an encoder-decoder (:class:`~lmforge.models.seq2seq.Seq2SeqLM`)
    by beam search: a list of (ids without bos and eos, score), one per source (``num_return_sequences``
    per source, best first, with that option).

    Targets start from ``bos_id``; sources are right-padded with ``pad_id``; at most
    ``max_new_tokens`` tokens (and the model's ``block_size``) are generated. Scores and stopping are
    as in Hugging Face (see the module docstring); ``beam_size`` 1 is greedy decoding.
    """
    max_new_tokens = min(max_new_tokens, model.config.block_size)
    if max_new_tokens < 1:
        return [([], 0.0) for _ in range(len(sources) * num_return_sequences)]
    decoding = Seq2SeqDecoding(model, sources, bos_id, pad_id, max_new_tokens)
    return search(decoding, len(sources), beam_size=beam_size, max_new_tokens=max_new_tokens, eos_id=eos_id,
                  length_penalty=length_penalty, early_stopping=early_stopping,
                  no_repeat_ngram_size=no_repeat_ngram_size, context=[bos_id],
                  num_return_sequences=num_return_sequences)

"""Task heads around a backbone: sequence classification and extractive-QA span extraction.

A backbone is any model with ``hidden_states(input_ids (B, T), attention_mask=None) -> (B, T, C)``
(final normed states; C is ``backbone.config.n_embd``) and a ``config``: the encoder, the decoder
and the LSTM families. A head keeps the backbone as ``backbone`` and its own layer as ``head``, so
a task checkpoint's weights are ``backbone.*`` (loadable into the bare backbone by dropping the
prefix) and ``head.*``.

    SequenceClassifier   states -> pool one position per row -> dropout -> head -> logits (B, L)
                         [+ the text's hashed uni- and bigram bag -> logits (B, L): wide & deep]
    SpanExtractor        [question matches -> backbone inputs] states -> head -> start and end logits, each (B, T)

Multi-label classification turns (B, L) sigmoid probabilities into label sets with a threshold per
label (:func:`predict_label_sets`); :func:`choose_thresholds` picks the thresholds that maximise
each label's F1 on held-out probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError

POOLINGS = ("first", "last", "mean")
MASKED_LOGIT = -1e4  # start/end logit of padding: no chance under softmax, finite in fp16 and bf16
GOLDEN_32 = 0x9E3779B1  # Knuth's multiplicative hash: n-gram key -> 32 well-mixed bits


def pool(states: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """One state per row, (B, T, C) -> (B, C): the first real token (``"first"``: an encoder's bos,
    BERT's CLS), the last real token (``"last"``: what a causal model has read the whole text at), or
    the mean over the real tokens (``"mean"``: sentence-embedding style, often better for encoders whose
    first token was never trained to summarise the text, e.g. after MLM pretraining alone).

    ``attention_mask`` (B, T) bool marks the real tokens; rows may be right- or left-padded.
    """
    B, T, _ = states.shape
    rows = torch.arange(B, device=states.device)
    if pooling == "mean":
        if attention_mask is None:
            return states.mean(dim=1)
        weights = attention_mask.to(states.dtype)[..., None]  # (B, T, 1)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    if attention_mask is None:
        return states[:, 0] if pooling == "first" else states[:, -1]
    real = attention_mask.bool().long()  # (B, T)
    if pooling == "first":
        position = real.argmax(-1)  # (B,) the first real token
    else:
        position = T - 1 - real.flip(-1).argmax(-1)  # (B,) the last real token
    return states[rows, position]  # (B, C)


def _init_linear(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class SequenceClassifier(nn.Module):
    """Labels of whole texts: input ids (B, T) -> logits (B, num_labels).

    Args:
        backbone: a model with ``hidden_states`` (see the module docstring).
        num_labels: classes (single-label: softmax over them) or labels (multi-label: one sigmoid each);
            the loss decides, see :func:`lmforge.training.objectives.classification_loss`.
        pooling: ``"first"`` (encoders, whose inputs start with bos) or ``"last"`` (causal backbones:
            the last real token, e.g. eos).
        dropout: dropout on the pooled state during training.
        ngram_buckets: with N > 0, a linear bag of n-grams beside the backbone (Wide & Deep, Cheng et al.
            2016; the bag is fastText's, Joulin et al. 2017): the text's token unigrams and bigrams, read
            through ``ngram_ids`` (:func:`lmforge.data.folding.folded_ids`: case and spaces folded away),
            hash into an (N, num_labels) table (``ngram_table``, starting at zero) whose rows, summed and
            divided by the root of their count (as TF-IDF's L2-normalised rows), add to the logits. What
            a TF-IDF + logistic-regression baseline lives on, learnt jointly with the backbone.
        ngram_ids: (V,) the id each token counts as in the bag (default: its own).
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "first", dropout: float = 0.1,
                 ngram_buckets: int = 0, ngram_ids: Tensor | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        if num_labels < 1:
            raise ConfigError(f"a classifier needs at least one label, not {num_labels}")
        if ngram_buckets < 0:
            raise ConfigError(f"ngram_buckets must be 0 (no n-gram bag) or more, not {ngram_buckets}")
        self.backbone = backbone
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.n_embd, num_labels)
        _init_linear(self.head)
        self.ngram_buckets = ngram_buckets
        if ngram_buckets:
            self.ngram_table = nn.Embedding(ngram_buckets, num_labels)
            nn.init.zeros_(self.ngram_table.weight)
            if ngram_ids is None:
                ngram_ids = torch.arange(backbone.config.vocab_size)
            self.register_buffer("ngram_ids", ngram_ids.long().clone())  # (V,), saved with the weights

    @property
    def config(self) -> ModelConfig:
        """The backbone's config (what a checkpoint saves)."""
        return self.backbone.config

    def ngram_buckets_of(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The bag's rows for ids (B, T): (bucket (B, 2T - 1) long, present (B, 2T - 1) bool), the T unigrams
        then the T - 1 bigrams of adjacent tokens; an n-gram is present when all its tokens are real."""
        ids = self.ngram_ids[input_ids]                                                 # (B, T)
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        vocab = self.ngram_ids.shape[0]
        bigrams = vocab + ids[:, :-1] * vocab + ids[:, 1:]                              # (B, T - 1), past unigrams
        keys = torch.cat([ids, bigrams], dim=1)                                         # (B, 2T - 1)
        present = torch.cat([real, real[:, :-1] & real[:, 1:]], dim=1)                  # (B, 2T - 1)
        mixed = (keys * GOLDEN_32) & 0xFFFFFFFF                                         # 32 bits of each key
        return (mixed * self.ngram_buckets) >> 32, present                              # high bits -> [0, N)

    def ngram_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The n-gram bag's logits (B, num_labels) of ids (B, T): the rows of the present n-grams, summed
        and divided by the square root of their count."""
        buckets, present = self.ngram_buckets_of(input_ids, attention_mask)
        rows = self.ngram_table(buckets) * present[..., None]                           # (B, 2T - 1, L)
        return rows.sum(dim=1) / present.sum(dim=1, keepdim=True).clamp_min(1).sqrt()

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, num_labels) of ids (B, T); ``attention_mask`` (B, T) bool is True for real tokens."""
        states = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, C)
        logits = self.head(self.dropout(pool(states, attention_mask, self.pooling)))    # (B, L)
        if self.ngram_buckets:
            logits = logits + self.ngram_logits(input_ids, attention_mask)
        return logits


class SpanExtractor(nn.Module):
    """Extractive QA: input ids (B, T) -> (start logits, end logits), each (B, T).

    Every position scores as an answer's first and last token; padding positions (``attention_mask``
    False) get :data:`MASKED_LOGIT`. Position 0 (bos) is a valid target: "the answer is not in this
    window", as in BERT's SQuAD recipe (see :mod:`lmforge.data.qa`).

    With ``separator_id`` (the token between question and context, see :mod:`lmforge.data.qa`) the head
    also marks each context token that occurs in the question (DrQA's exact-match feature, Chen et al.
    2017) and adds a learned embedding of that mark (``match_emb``, 2 x C, starting at zero) to the
    backbone's inputs: the word-overlap signal that a sliding-window baseline lives on, given to the
    model instead of left for its attention to discover from few examples. Tokens match when their
    ``match_ids`` agree: by default their ids; :func:`lmforge.data.folding.folded_ids` maps case and a
    leading space away.
    """

    def __init__(self, backbone: nn.Module, separator_id: int | None = None, match_ids: Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 2)
        _init_linear(self.head)
        self.separator_id = separator_id
        if separator_id is not None:
            self.match_emb = nn.Embedding(2, backbone.config.n_embd)
            nn.init.zeros_(self.match_emb.weight)
            if match_ids is None:
                match_ids = torch.arange(backbone.config.vocab_size)
            self.register_buffer("match_ids", match_ids.long().clone())  # (V,), saved with the weights

    @property
    def config(self) -> ModelConfig:
        """The backbone's config (what a checkpoint saves)."""
        return self.backbone.config

    def question_matches(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) bool: the context tokens of rows ``bos question sep context sep`` whose match id also
        occurs in their row's question (rows may be padded on either side)."""
        T = input_ids.shape[1]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        position = torch.arange(T, device=input_ids.device)
        first = real.long().argmax(-1, keepdim=True)                           # (B, 1) the bos
        separator = (input_ids == self.separator_id) & real & (position > first)
        part = separator.long().cumsum(-1)                                     # 0: bos + question, 1: context
        question = real & (part == 0) & (position > first)
        context = real & (part == 1) & ~separator
        ids = self.match_ids[input_ids]                                        # (B, T)
        same = ids[:, :, None] == ids[:, None, :]                              # (B, T, T)
        return context & (same & question[:, None, :]).any(-1)

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(start_logits, end_logits), each (B, T), of ids (B, T) with an optional (B, T) bool mask."""
        offsets = None
        if self.separator_id is not None:
            offsets = self.match_emb(self.question_matches(input_ids, attention_mask).long())  # (B, T, C)
        states = self.backbone.hidden_states(input_ids, attention_mask=attention_mask,
                                             input_offsets=offsets)                     # (B, T, C)
        start_logits, end_logits = self.head(states).unbind(-1)                         # (B, T) each
        if attention_mask is not None:
            padding = ~attention_mask.bool()
            start_logits = start_logits.masked_fill(padding, MASKED_LOGIT)
            end_logits = end_logits.masked_fill(padding, MASKED_LOGIT)
        return start_logits, end_logits


# ------------------------------------------------------------------------------------------
# Multi-label decisions
# ------------------------------------------------------------------------------------------
def predict_label_sets(probs: Tensor, thresholds: float | Sequence[float] | Tensor = 0.5) -> list[list[int]]:
    """The labels of each row: (B, L) sigmoid probabilities -> B sorted lists of label indices whose
    probability is at least that label's threshold (one number for all labels, or L of them)."""
    thresholds = torch.as_tensor(thresholds, dtype=probs.dtype, device=probs.device)
    if thresholds.dim() == 1 and thresholds.shape[0] != probs.shape[-1]:
        raise ConfigError(f"{thresholds.shape[0]} thresholds for {probs.shape[-1]} labels")
    chosen = probs >= thresholds  # (B, L)
    return [row.nonzero().flatten().tolist() for row in chosen.cpu()]


def choose_thresholds(probs: Tensor, targets: Tensor, default: float = 0.5) -> Tensor:
    """Per-label thresholds (L,) that maximise each label's F1 on held-out data.

    Args:
        probs: (N, L) sigmoid probabilities of N held-out texts.
        targets: (N, L) gold labels, 0/1 (or bool).
        default: the threshold of a label with no positive example (its F1 is 0 whatever the choice).

    Predicting "label present when prob >= threshold", every cut between two distinct sorted
    probabilities is tried; the threshold is the midpoint of the cut (of cuts with equal F1, the
    highest). Predicting no text positive is never best for a label with positives.
    """
    if probs.shape != targets.shape or probs.dim() != 2:
        raise ValueError(f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} must both be (N, L)")
    probs, gold = probs.detach().float().cpu(), targets.detach().cpu() > 0.5
    N = probs.shape[0]
    if N == 0:
        return torch.full((probs.shape[1],), float(default))
    ordered, order = probs.sort(dim=0, descending=True)              # (N, L)
    true_positives = gold.gather(0, order).float().cumsum(0)         # (N, L): TP when the top k+1 are predicted
    positives = gold.float().sum(0)                                  # (L,)
    predicted = torch.arange(1, N + 1, dtype=torch.float32)[:, None]  # (N, 1)
    f1 = 2 * true_positives / (predicted + positives)                # (N, L)
    below = torch.cat([ordered[1:], torch.full_like(ordered[:1], -1.0)])  # next lower probability
    f1 = f1.masked_fill(ordered <= below, -1.0)                      # a cut inside a tie is not a cut
    best = f1.argmax(0)                                              # (L,) the first (highest) best cut
    columns = torch.arange(probs.shape[1])
    upper, lower = ordered[best, columns], below[best, columns]
    thresholds = torch.where(best == N - 1, upper, (upper + lower) / 2)
    thresholds = torch.where(thresholds > lower, thresholds, upper)  # midpoint rounded onto the lower value
    return torch.where(positives > 0, thresholds, torch.full_like(thresholds, float(default)))

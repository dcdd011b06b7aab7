"""Objectives: ``(model, batch) -> loss``. A recipe picks one; the loop never looks inside.

The token and class objectives take ``label_smoothing`` (``train.label_smoothing``): that share of each
target's probability is spread evenly over every token or class, as in ``F.cross_entropy``. A recipe
binds it with :func:`functools.partial`; validation losses are always computed unsmoothed.

The seq2seq and classification objectives also take ``rdrop`` (``train.rdrop``, R-Drop, Liang et al.
2021): the batch runs twice in one forward pass (two independent dropout masks), the loss is the mean of
the two passes' losses plus ``rdrop`` times the symmetric KL divergence between their predictions, a
regulariser that asks the model to agree with itself under dropout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy over the labels that are not ``IGNORE_INDEX``.

    ``batch["input_ids"]`` and ``batch["labels"]`` are (B, T); labels are the inputs shifted by one.
    """
    logits = model(batch["input_ids"])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


def summed_causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of next-token cross-entropies, number of predicted tokens), for exact averages."""
    logits = model(batch["input_ids"])
    labels = batch["labels"].flatten()
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------
# Masked-language modelling (encoder family)
# ------------------------------------------------------------------------------------------
def mask_tokens(input_ids: Tensor, mask_id: int, vocab_size: int, probability: float = 0.15,
                keep: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's corruption: each token is chosen with ``probability`` (never those where ``keep`` is
    True, e.g. padding or special tokens); a chosen token becomes the mask token 80% of the time,
    a random token 10%, and stays itself 10%.

    Returns (corrupted ids, labels): both (B, T); labels are the original ids at chosen positions
    and ``IGNORE_INDEX`` elsewhere. Uses the torch RNG (restored on resume, so runs stay exact).
    """
    device = input_ids.device
    chosen = torch.rand(input_ids.shape, device=device, generator=generator) < probability
    if keep is not None:
        chosen &= ~keep
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    action = torch.rand(input_ids.shape, device=device, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    corrupted = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return corrupted, labels


def masked_lm_objective(mask_id: int, vocab_size: int, probability: float = 0.15,
                        special_ids: set[int] | None = None,
                        label_smoothing: float = 0.0) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """An objective that corrupts ``batch["input_ids"]`` (B, T) with :func:`mask_tokens` and returns
    the mean cross-entropy of the model's predictions (B, T, V) of the original tokens at the chosen
    positions. Special tokens (``special_ids``) are never chosen."""
    special = torch.tensor(sorted(special_ids or ()), dtype=torch.long)

    def masked_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits, labels = _masked_predictions(model, batch, mask_id, vocab_size, probability, special)
        if not len(labels):  # nothing chosen in a tiny batch: a zero that keeps the graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

    return masked_lm_loss


def summed_masked_lm_loss(mask_id: int, vocab_size: int, probability: float, special_ids: set[int] | None,
                          model: nn.Module, batch: dict[str, Tensor],
                          generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """(sum of the masked tokens' cross-entropies, number of masked tokens), masking with ``generator``
    (a fixed seed gives a fixed evaluation set)."""
    special = torch.tensor(sorted(special_ids or ()), dtype=torch.long)
    logits, labels = _masked_predictions(model, batch, mask_id, vocab_size, probability, special, generator)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), len(labels)


def _masked_predictions(model: nn.Module, batch: dict[str, Tensor], mask_id: int, vocab_size: int,
                        probability: float, special: Tensor,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The model's logits (N, V) at the N chosen positions of a corrupted batch, and their labels (N,)."""
    ids = batch["input_ids"]
    keep = torch.isin(ids, special.to(ids.device)) if len(special) else None
    attention = batch.get("attention_mask")
    if attention is not None:
        keep = ~attention if keep is None else keep | ~attention
    corrupted, labels = mask_tokens(ids, mask_id, vocab_size, probability, keep, generator)
    chosen = labels != IGNORE_INDEX
    return model(corrupted, attention_mask=attention, positions=chosen), labels[chosen]


# ------------------------------------------------------------------------------------------
# Denoising (encoder-decoder family): BART's text infilling
# ------------------------------------------------------------------------------------------
def infill_spans(ids: Tensor, mask_id: int, pad_id: int, probability: float = 0.3, mean_span: float = 3.0,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BART's text infilling: spans starting at random tokens (each with chance ``probability /
    mean_span``; lengths ~ Poisson(``mean_span``), at least 1; about ``probability`` of the tokens in
    all) are each replaced by one mask token, so the model must also tell how much is missing.

    ``ids`` (B, T) -> (source ids (B, S), source mask (B, S) bool), rows right-padded with ``pad_id``,
    S <= T. Uses the torch RNG unless ``generator`` is given (restored on resume, like MLM's masks).
    """
    B, T = ids.shape
    device = ids.device
    starts = torch.rand(ids.shape, device=device, generator=generator) < probability / mean_span
    lengths = torch.poisson(torch.full(ids.shape, mean_span, device=device), generator=generator).long().clamp_min(1)
    position = torch.arange(T, device=device).expand(B, T)
    span_end = torch.where(starts, position + lengths, -1)           # (B, T) exclusive end of a span starting here
    masked = span_end.cummax(dim=1).values > position                # inside some span
    opens = masked & ~F.pad(masked, (1, 0))[:, :-1]                  # the first token of each masked run
    kept = ~masked | opens                                           # a run shrinks to its first position
    tokens = torch.where(masked, torch.full_like(ids, mask_id), ids)
    lengths_kept = kept.sum(1)                                       # (B,)
    S = int(lengths_kept.max())
    order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)[:, :S]  # kept positions first, in order
    source_mask = torch.arange(S, device=device) < lengths_kept[:, None]
    return tokens.gather(1, order).masked_fill(~source_mask, pad_id), source_mask


def _denoising_predictions(model: nn.Module, ids: Tensor, mask_id: int, pad_id: int, bos_id: int,
                           probability: float, mean_span: float,
                           generator: torch.Generator | None = None) -> Tensor:
    """The model's (B, T, V) logits for reconstructing ``ids`` (B, T) from its infilled version; the
    decoder reads bos + ``ids`` shifted right."""
    source, source_mask = infill_spans(ids, mask_id, pad_id, probability, mean_span, generator)
    decoder_ids = torch.cat([torch.full_like(ids[:, :1], bos_id), ids[:, :-1]], dim=1)
    return model(source, attention_mask=source_mask, decoder_input_ids=decoder_ids)


def denoising_objective(mask_id: int, pad_id: int, bos_id: int, probability: float = 0.3, mean_span: float = 3.0,
                        label_smoothing: float = 0.0) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """Encoder-decoder pretraining (BART): the mean cross-entropy of reconstructing every token of
    ``batch["input_ids"]`` (B, T) from a copy corrupted by :func:`infill_spans`."""

    def denoising_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        logits = _denoising_predictions(model, ids, mask_id, pad_id, bos_id, probability, mean_span)
        return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), label_smoothing=label_smoothing)

    return denoising_loss


def summed_denoising_loss(mask_id: int, pad_id: int, bos_id: int, probability: float, mean_span: float,
                          model: nn.Module, batch: dict[str, Tensor],
                          generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """(sum of the reconstruction cross-entropies, number of tokens), corrupting with ``generator``."""
    ids = batch["input_ids"]
    logits = _denoising_predictions(model, ids, mask_id, pad_id, bos_id, probability, mean_span, generator)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="sum")
    return loss, ids.numel()


# ------------------------------------------------------------------------------------------
# Sequence-to-sequence, classification and span extraction
# ------------------------------------------------------------------------------------------
def twice(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch stacked on itself: every (B, ...) tensor becomes (2B, ...) (R-Drop's two passes)."""
    return {name: torch.cat([value, value]) for name, value in batch.items()}


def symmetric_kl(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Mean over the N rows of (KL(p_a || p_b) + KL(p_b || p_a)) / 2, where p = softmax(logits (N, V))."""
    log_a, log_b = F.log_softmax(logits_a.float(), -1), F.log_softmax(logits_b.float(), -1)
    return ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1).mean() / 2


def seq2seq_loss(model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0,
                 rdrop: float = 0.0) -> Tensor:
    """Mean cross-entropy of the target tokens: ``input_ids``/``attention_mask`` (B, S) are the
    source, ``decoder_input_ids`` (B, T) the target shifted right (starting with bos) and ``labels``
    (B, T) the target (``IGNORE_INDEX`` on padding); with ``rdrop``, plus that times the symmetric KL
    of two dropout passes over the target tokens."""
    if rdrop:
        batch = twice(batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"]).float()  # (B, T, V), (2B, T, V) with rdrop
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)
    if not rdrop:
        return loss
    first, second = logits.chunk(2)
    targets = labels.chunk(2)[0] != IGNORE_INDEX  # (B, T)
    return loss + rdrop * symmetric_kl(first[targets], second[targets])


def classification_loss(model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0,
                        rdrop: float = 0.0) -> Tensor:
    """Cross-entropy of (B, L) logits against ``labels``: class indices (B,) for single-label data,
    or 0/1 floats (B, L) for multi-label data (one sigmoid per label, whose smoothed target is
    ``y (1 - s) + s / 2``); with ``rdrop``, plus that times the symmetric KL of two dropout passes
    (per label for multi-label data)."""
    if rdrop:
        batch = twice(batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # (B, L)
    labels = batch["labels"]
    if labels.dim() == 2:
        targets = labels.float() * (1.0 - label_smoothing) + label_smoothing / 2
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        logits = torch.stack([torch.zeros_like(logits), logits], -1)  # (B, L, 2): a sigmoid as a softmax
    else:
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if not rdrop:
        return loss
    first, second = logits.chunk(2)
    return loss + rdrop * symmetric_kl(first.flatten(0, -2), second.flatten(0, -2))


def span_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Extractive QA: mean of the cross-entropies of the start and end positions (B,) under the
    model's (B, T) start and end logits."""
    start_logits, end_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return (F.cross_entropy(start_logits.float(), batch["start_positions"])
            + F.cross_entropy(end_logits.float(), batch["end_positions"])) / 2


def media_loss(model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of the target tokens of a multimodal batch
    (:func:`lmforge.data.media_rows.collate_media`): ``media`` (B, ...), ``input_ids`` (B, T) and
    ``labels`` (B, T) (``IGNORE_INDEX`` off the target), plus ``attention_mask`` and
    ``decoder_input_ids`` for cross fusion."""
    logits = model(batch["input_ids"], media=batch["media"], attention_mask=batch.get("attention_mask"),
                   decoder_input_ids=batch.get("decoder_input_ids")).float()  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)

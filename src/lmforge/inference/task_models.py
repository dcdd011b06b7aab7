"""Inference of the task models: class probabilities, answer spans, and seq2seq outputs.

These run a task model on raw texts, encoding them exactly as the training data was encoded
(:mod:`lmforge.data.task_rows`), so that :class:`lmforge.api.LanguageModel`, the evaluators of the task
recipes and the server share one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.config import SamplingConfig
from lmforge.data.qa import best_span, qa_windows
from lmforge.data.task_rows import QAExample, encode_source, encode_text, pad_id_of, pad_rows
from lmforge.errors import ConfigError
from lmforge.models import eval_mode
from lmforge.tokenizer import Tokenizer


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------
@dataclass
class Classification:
    """Scores of a text's candidate labels: probabilities that sum to 1 (single-label), or one
    independent probability per label (multi-label)."""

    scores: dict[str, float]
    label: str                  # the most likely label
    labels: list[str]           # multi-label: the labels over their thresholds; else [label]


def classification_probabilities(logits: Tensor, multi_label: bool) -> Tensor:
    """(B, L) logits -> (B, L) probabilities: a softmax over labels, or one sigmoid per label."""
    return logits.sigmoid() if multi_label else logits.softmax(-1)


def classify_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], multi_label: bool,
                   batch_size: int = 32) -> Tensor:
    """(N, L) probabilities of a :class:`~lmforge.models.heads.SequenceClassifier` for N texts.
    Texts are sorted by length so that batches carry little padding."""
    device = next(model.parameters()).device
    rows = [encode_text(tokenizer, text, model.config.block_size) for text in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    results: dict[int, Tensor] = {}
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            ids, mask = pad_rows([rows[i] for i in chosen], pad_id_of(tokenizer))
            logits = model(ids.to(device), attention_mask=mask.to(device)).float()
            for i, row in zip(chosen, classification_probabilities(logits, multi_label).cpu()):
                results[i] = row
    return torch.stack([results[i] for i in range(len(rows))])


# ------------------------------------------------------------------------------------------
# Extractive question answering
# ------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """An answer span: its text, score (start + end logits) and character span in the context."""

    text: str
    score: float
    start: int | None
    end: int | None


def qa_rows(tokenizer: Tokenizer, example: QAExample, max_length: int, stride: int) -> list[tuple[list[int], int, int]]:
    """Training rows ``(ids, start position, end position)`` of one question: one per window of its
    context (position 0 where the first gold answer is not inside the window)."""
    windows = qa_windows(tokenizer, example.question, example.context, max_length, stride,
                         answer=(example.starts[0], example.starts[0] + len(example.answers[0])))
    return [(w.input_ids, w.start_position, w.end_position) for w in windows]


def answer_questions(model: nn.Module, tokenizer: Tokenizer, questions: Sequence[str], contexts: Sequence[str],
                     max_length: int, stride: int, max_answer_tokens: int = 30, batch_size: int = 32) -> list[Answer]:
    """The best span of each context for its question, by a :class:`~lmforge.models.heads.SpanExtractor`
    run over every window of the context."""
    device = next(model.parameters()).device
    per_question = [qa_windows(tokenizer, q, c, max_length, stride) for q, c in zip(questions, contexts)]
    flat = [(i, w) for i, windows in enumerate(per_question) for w in windows]
    starts: list[list[Tensor]] = [[] for _ in questions]
    ends: list[list[Tensor]] = [[] for _ in questions]
    with eval_mode(model), torch.inference_mode():
        for first in range(0, len(flat), batch_size):
            chunk = flat[first:first + batch_size]
            ids, mask = pad_rows([w.input_ids for _, w in chunk], pad_id_of(tokenizer))
            start_logits, end_logits = model(ids.to(device), attention_mask=mask.to(device))
            for row, (i, window) in enumerate(chunk):
                n = len(window.input_ids)
                starts[i].append(start_logits[row, :n].float().cpu())
                ends[i].append(end_logits[row, :n].float().cpu())
    answers = []
    for i, windows in enumerate(per_question):
        best = best_span(windows, starts[i], ends[i], contexts[i], max_answer_tokens)
        answers.append(Answer(best.text, best.score, *best.chars))
    return answers


# ------------------------------------------------------------------------------------------
# Sequence to sequence
# ------------------------------------------------------------------------------------------
def translate_ids(model: nn.Module, tokenizer: Tokenizer, sources: Sequence[Sequence[int]], *,
                  max_new_tokens: int = 64, beam_size: int = 1, length_penalty: float = 1.0,
                  early_stopping: bool = True, no_repeat_ngram_size: int = 0,
                  sampling: SamplingConfig | None = None, batch_size: int = 32,
                  num_return_sequences: int = 1) -> list[list[int]]:
    """Target ids for encoded sources: beam search with ``beam_size`` > 1, else greedy (or
    ``sampling``); with ``num_return_sequences`` n (beam search only) the n best of every source, best
    first, source after source. Sources are sorted by length so that batches carry little padding."""
    from lmforge.inference.beam import beam_search  # the seq2seq family's own generation
    from lmforge.inference.seq2seq_decoding import generate_seq2seq

    if sampling is None:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    if num_return_sequences > 1 and beam_size < num_return_sequences:
        raise ConfigError(f"{num_return_sequences} outputs per source need beam_size >= {num_return_sequences}, "
                          f"not {beam_size}")
    n = num_return_sequences
    results: dict[int, list[list[int]]] = {}
    pad = pad_id_of(tokenizer)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = [list(sources[i]) for i in chosen]
            if beam_size > 1:
                outputs: list[Any] = beam_search(model, batch, beam_size=beam_size, max_new_tokens=max_new_tokens,
                                                 length_penalty=length_penalty, early_stopping=early_stopping,
                                                 no_repeat_ngram_size=no_repeat_ngram_size, bos_id=tokenizer.bos_id,
                                                 eos_id=tokenizer.eos_id, pad_id=pad, num_return_sequences=n)
                outputs = [ids for ids, _ in outputs]
            else:
                outputs = generate_seq2seq(model, batch, sampling, tokenizer.bos_id, tokenizer.eos_id, pad)
            results.update((i, outputs[k * n:(k + 1) * n]) for k, i in enumerate(chosen))
    return [ids for i in range(len(sources)) for ids in results[i]]


def translate_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], *, mbr: str | None = None,
                    **options: Any) -> list[str]:
    """Target texts for source texts (see :func:`translate_ids` for the options). With ``mbr`` (a
    utility: ``"bleu"`` or ``"chrf"``) every hypothesis of the beam is a candidate and the one that agrees
    most with the others is returned (:func:`lmforge.inference.mbr.mbr_choose`)."""
    from lmforge.inference.mbr import check_utility, mbr_choose

    sources = [encode_source(tokenizer, text, model.config.block_size) for text in texts]
    if mbr is None:
        return [tokenizer.decode(ids).strip() for ids in translate_ids(model, tokenizer, sources, **options)]
    check_utility(mbr)
    n = options.get("beam_size", 1)
    if n < 2:
        raise ConfigError(f"mbr chooses among the hypotheses of a beam; it needs beam_size >= 2, not {n}")
    outputs = [tokenizer.decode(ids).strip()
               for ids in translate_ids(model, tokenizer, sources, num_return_sequences=n, **options)]
    return [outputs[k + mbr_choose(outputs[k:k + n], mbr)] for k in range(0, len(outputs), n)]

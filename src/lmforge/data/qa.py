"""Extractive question answering: question + context -> model windows, and logits -> answer text.

A window is one model input (BERT's SQuAD recipe, with bos standing for CLS)::

    bos  question tokens  eos  context tokens [s, s + room)  eos
    0                          context_start ... context_end

``room = max_length - len(question tokens) - 3`` context tokens fit in a window. A longer context is
split into overlapping windows: **``stride`` is the overlap**, the number of context tokens that
consecutive windows share (as Hugging Face's ``stride``), so window k starts at context token
``k * (room - stride)`` and an answer near a boundary lies whole inside at least one window when it
is at most ``stride + 1`` tokens long.

Every window records, per input position, the ``(char_start, char_end)`` span of the original context
that belongs to the token (None for the question and the special tokens): the characters whose
first byte is in the token (:func:`char_spans`). For a char tokenizer, and for byte-level BPE
tokens that hold whole characters, that is just the text of the token. A byte-level token may hold
the end of one character and the start of the next (``日本`` split as ``E6 97 | A5 E6 | 9C | AC E8
| ...``); giving each character to the token holding its first byte makes the spans of consecutive
tokens disjoint and contiguous, so the tokens of an answer, mapped back, give exactly the answer.

For training, a window carries the answer's first and last token positions when the whole answer
lies inside its context part, else 0 for both: bos, "not in this window". At inference,
:func:`best_span` scores every span of context tokens of every window and maps the best one back
to the context's characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer

Offset = tuple[int, int]


def char_spans(offsets: Sequence[Offset]) -> list[Offset]:
    """Per token, the characters that start in it, from the tokenizer's ``offsets`` (per token, every
    character it holds a byte of). Tokens holding only continuation bytes get an empty span at the
    next character; the spans are in order, disjoint, and cover what the offsets cover."""
    spans, covered = [], 0
    for start, end in offsets:
        start = max(start, covered)  # a character shared with the previous token is the previous token's
        end = max(end, start)
        spans.append((start, end))
        covered = end
    return spans


@dataclass
class QAWindow:
    """One model input for a question about (part of) a context.

    Attributes:
        input_ids: bos + question + eos + context tokens + eos.
        offsets: per input position, the ``(char_start, char_end)`` context span of the characters that
            start in the token (see :func:`char_spans`); None for question and special tokens.
        context_start, context_end: the input positions ``[context_start, context_end)`` of the
            context tokens.
        start_position, end_position: training target, the input positions of the answer's first
            and last token, or 0 (bos) for both when the answer is not wholly inside this window.
    """

    input_ids: list[int]
    offsets: list[Offset | None]
    context_start: int
    context_end: int
    start_position: int = 0
    end_position: int = 0

    @property
    def has_answer(self) -> bool:
        """Whether the training answer lies wholly inside this window."""
        return self.start_position > 0


class AnswerSpan(NamedTuple):
    """The best answer: its text, its score (start + end logit) and ``context[chars[0]:chars[1]] == text``."""

    text: str
    score: float
    chars: Offset


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(bos, eos) ids; a tokenizer without bos or eos uses its document-start token for it."""
    start = tokenizer.start_ids[0]
    return (start if tokenizer.bos_id is None else tokenizer.bos_id,
            start if tokenizer.eos_id is None else tokenizer.eos_id)


def separator_id(tokenizer: Tokenizer) -> int:
    """The token between a window's question and its context (its eos)."""
    return _special_ids(tokenizer)[1]


def answer_tokens(spans: Sequence[Offset], answer: Offset) -> tuple[int, int]:
    """The first and last token (indices into ``spans``, from :func:`char_spans`) whose characters
    overlap the ``answer`` character span (a BPE token may start with a space before the answer)."""
    char_start, char_end = answer
    first = next((i for i, (start, end) in enumerate(spans) if end > max(start, char_start)), None)
    last = next((i for i in range(len(spans) - 1, -1, -1) if spans[i][0] < min(spans[i][1], char_end)), None)
    if first is None or last is None or first > last:
        raise DataError(f"no token of the context covers the answer's characters [{char_start}, {char_end})")
    return first, last


def qa_windows(tokenizer: Tokenizer, question: str, context: str, max_length: int, stride: int = 128,
               answer: Offset | None = None) -> list[QAWindow]:
    """The windows of ``question`` about ``context``, each at most ``max_length`` tokens.

    Args:
        tokenizer: encodes the question, and the context with character offsets.
        max_length: the model's context (``config.block_size``).
        stride: context tokens shared by consecutive windows (the overlap, not the step).
        answer: for training, the gold answer's ``(char_start, char_end)`` in ``context``; the windows
            then carry its token positions (0 where it is not wholly inside).

    Raises:
        DataError: the question leaves no room for context tokens in ``max_length``, or the answer span
            is not inside the context.
        ConfigError: the context needs several windows but ``stride`` is not smaller than the room for
            context tokens per window (the windows would not advance).
    """
    bos, eos = _special_ids(tokenizer)
    question_ids = tokenizer.encode(question)
    context_ids, offsets = tokenizer.encode_with_offsets(context)
    context_offsets = char_spans(offsets)
    room = max_length - len(question_ids) - 3  # bos, eos after the question, eos at the end
    if room < 1:
        raise DataError(f"the question is {len(question_ids)} tokens long, which leaves no room for the context in "
                        f"a {max_length}-token window (bos + question + eos + context + eos); shorten it to at most "
                        f"{max_length - 4} tokens")
    if len(context_ids) > room and not 0 <= stride < room:
        raise ConfigError(f"stride {stride} must be >= 0 and smaller than the {room} context tokens that fit beside "
                          f"this {len(question_ids)}-token question in a {max_length}-token window")
    target = None
    if answer is not None:
        if not 0 <= answer[0] < answer[1] <= len(context):
            raise DataError(f"answer span {answer} is not a non-empty span of the {len(context)}-character context")
        target = answer_tokens(context_offsets, answer)

    prefix = [bos, *question_ids, eos]
    windows = []
    start = 0
    while True:
        end = min(start + room, len(context_ids))
        window = QAWindow(prefix + context_ids[start:end] + [eos],
                          [None] * len(prefix) + context_offsets[start:end] + [None],
                          len(prefix), len(prefix) + end - start)
        if target is not None and start <= target[0] and target[1] < end:
            window.start_position = window.context_start + target[0] - start
            window.end_position = window.context_start + target[1] - start
        windows.append(window)
        if end >= len(context_ids):
            return windows
        start += room - stride


def best_span(windows: Sequence[QAWindow], start_logits: Sequence[Tensor] | Tensor,
              end_logits: Sequence[Tensor] | Tensor, context: str, max_answer_tokens: int = 30) -> AnswerSpan:
    """The best answer of all windows of one question: the span of context tokens ``i <= j < i +
    max_answer_tokens`` with the highest ``start_logits[i] + end_logits[j]``, where tokens i and j
    hold characters (a token of continuation bytes only cannot start or end an answer).

    Args:
        windows: from :func:`qa_windows` for this ``context``.
        start_logits, end_logits: per window, (T,) logits with T >= the window's length (padding past
            it is ignored); a (W, T) tensor or a list of W tensors.
        context: the original context text.
        max_answer_tokens: the longest answer considered, in tokens.

    Returns:
        ``AnswerSpan(text, score, (char_start, char_end))`` with ``context[char_start:char_end] == text``;
        whitespace around the span (a byte-level token's leading space) is left out. With no context
        token at all (an empty context): ``("", -inf, (0, 0))``.
    """
    if max_answer_tokens < 1:
        raise ConfigError(f"max_answer_tokens must be >= 1, not {max_answer_tokens}")
    best: tuple[float, QAWindow, int, int] | None = None
    for window, starts, ends in zip(windows, start_logits, end_logits):
        lo, hi = window.context_start, window.context_end
        if hi <= lo:
            continue
        starts = torch.as_tensor(starts)[lo:hi].float().cpu()  # (n,)
        ends = torch.as_tensor(ends)[lo:hi].float().cpu()      # (n,)
        n = hi - lo
        first, last = torch.arange(n)[:, None], torch.arange(n)[None, :]
        holds_chars = torch.tensor([end > start for start, end in window.offsets[lo:hi]])  # (n,)
        allowed = (last >= first) & (last - first < max_answer_tokens)                    # (n, n)
        allowed &= holds_chars[:, None] & holds_chars[None, :]
        scores = (starts[:, None] + ends[None, :]).masked_fill(~allowed, float("-inf"))
        flat = int(scores.argmax())
        score = float(scores.flatten()[flat])
        if score > float("-inf") and (best is None or score > best[0]):
            best = (score, window, lo + flat // n, lo + flat % n)
    if best is None:
        return AnswerSpan("", float("-inf"), (0, 0))
    score, window, i, j = best
    char_start, char_end = window.offsets[i][0], window.offsets[j][1]
    while char_start < char_end and context[char_start].isspace():
        char_start += 1
    while char_end > char_start and context[char_end - 1].isspace():
        char_end -= 1
    return AnswerSpan(context[char_start:char_end], score, (char_start, char_end))

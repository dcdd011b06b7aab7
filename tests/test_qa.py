"""Extractive-QA windows: layout, overlap, answer positions at window edges, exact char mapping back."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.folding import folded_ids
from lmforge.data.qa import AnswerSpan, QAWindow, best_span, char_spans, qa_windows, separator_id
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer

TEXTS = [
    "Le café est près du marché, à Paris. Ils boivent un café noir.",
    "日本語は難しいですが、東京の日本語学校で学びます。",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Question: where is the café? Answer: near the 日本語 school in Tōkyō.",
] * 10
CONTEXT = ("The café opened in 1998 near the river. Its owner, Aiko, speaks 日本語 and French. "
           "Every morning she bakes bread; every evening the café plays jazz until late.")


@pytest.fixture(scope="module", params=["char", "bpe"])
def tokenizer(request) -> Tokenizer:
    if request.param == "char":
        return Tokenizer.train(TEXTS + [CONTEXT], "char")
    return Tokenizer.train(TEXTS, "bpe", vocab_size=300)


def one_hot_logits(window: QAWindow, start: int, end: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One window's start and end logits (each a list of one (T,) tensor), 10 at start/end, else 0."""
    starts, ends = torch.zeros(len(window.input_ids)), torch.zeros(len(window.input_ids))
    starts[start], ends[end] = 10.0, 10.0
    return [starts], [ends]


def span_of(context: str, answer: str, occurrence: int = 0) -> tuple[int, int]:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return start, start + len(answer)


def test_window_layout_and_offsets(tokenizer):
    question = "Who owns the café?"
    (window,) = qa_windows(tokenizer, question, CONTEXT, max_length=400, stride=16)
    q = tokenizer.encode(question)
    assert window.input_ids[0] == tokenizer.bos_id
    assert window.input_ids[1:1 + len(q)] == q
    assert window.input_ids[1 + len(q)] == tokenizer.eos_id and window.input_ids[-1] == tokenizer.eos_id
    assert window.context_start == len(q) + 2 and window.context_end == len(window.input_ids) - 1
    assert window.offsets[:window.context_start] == [None] * window.context_start and window.offsets[-1] is None
    assert len(window.offsets) == len(window.input_ids)
    spans = window.offsets[window.context_start:window.context_end]
    # The spans tile the context: in order, disjoint, contiguous, everything covered.
    assert spans[0][0] == 0 and spans[-1][1] == len(CONTEXT)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert "".join(CONTEXT[s:e] for s, e in spans) == CONTEXT
    assert not window.has_answer and window.start_position == window.end_position == 0


def test_char_spans_give_split_characters_to_the_token_holding_their_first_byte():
    # Byte-level tokens of "x日本語": "x", [日 bytes 1-2], [日 byte 3 + 本 byte 1], [本 byte 2],
    # [本 byte 3 + 語 byte 1], [語 bytes 2-3]; the tokenizer's offsets cover every character touched.
    offsets = [(0, 1), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]
    assert char_spans(offsets) == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 4), (4, 4)]
    assert char_spans([(0, 3), (4, 6)]) == [(0, 3), (4, 6)]  # a gap (skipped whitespace) stays a gap


@pytest.mark.parametrize("answer", ["café", "1998", "Aiko", "日本語", "French", "jazz until late"])
def test_answer_positions_map_back_exactly(tokenizer, answer):
    question = "What is it?"
    chars = span_of(CONTEXT, answer)
    (window,) = qa_windows(tokenizer, question, CONTEXT, max_length=400, stride=16, answer=chars)
    assert window.has_answer
    assert window.context_start <= window.start_position <= window.end_position < window.context_end
    best = best_span([window], *one_hot_logits(window, window.start_position, window.end_position), CONTEXT)
    assert isinstance(best, AnswerSpan)
    assert best.text == answer and best.chars == chars and best.score == pytest.approx(20.0)
    assert CONTEXT[best.chars[0]:best.chars[1]] == best.text


@pytest.mark.parametrize("answer", ["日", "本", "語", "日本", "本語", "日本語", "Aiko: 日", "語 est"])
def test_characters_split_between_byte_tokens_map_back_exactly(answer):
    tok = Tokenizer.train(["Le café est près du marché. 日本語 は 難しい です。 The quick brown fox."] * 20, "bpe",
                          vocab_size=300)
    context = "Aiko: 日本語 est difficile."
    _, offsets = tok.encode_with_offsets(context)
    assert (6, 8) in offsets and (7, 9) in offsets  # tokens holding the end of one character and the start of the next
    chars = span_of(context, answer)
    (window,) = qa_windows(tok, "Quoi?", context, max_length=64, stride=4, answer=chars)
    best = best_span([window], *one_hot_logits(window, window.start_position, window.end_position), context)
    assert best.text == answer and best.chars == chars


def test_long_context_windows_overlap_by_stride(tokenizer):
    question = "Where?"
    ids, _ = tokenizer.encode_with_offsets(CONTEXT)
    max_length, stride = 30, 7
    room = max_length - len(tokenizer.encode(question)) - 3
    windows = qa_windows(tokenizer, question, CONTEXT, max_length, stride)
    assert len(windows) > 2 and all(len(w.input_ids) <= max_length for w in windows)
    assert all(w.context_end - w.context_start == room for w in windows[:-1])
    contexts = [w.input_ids[w.context_start:w.context_end] for w in windows]
    for previous, current in zip(contexts, contexts[1:]):
        assert previous[-stride:] == current[:stride]  # stride = tokens shared, not the step
    # Together the windows cover every context token once, beyond the overlaps.
    assert contexts[0] + [t for c in contexts[1:] for t in c[stride:]] == ids
    # The last window ends at the context's end.
    assert windows[-1].offsets[windows[-1].context_end - 1][1] == len(CONTEXT)


def test_answers_at_window_boundaries_and_in_the_overlap():
    tok = Tokenizer.train(TEXTS + [CONTEXT], "char")  # one token per character: positions are exact
    context = "abcdefghijklmnopqrstuvwxyz" * 2
    question = "q?"  # 2 tokens: room = 16 - 2 - 3 = 11 context tokens; stride 4: windows start at 0, 7, 14, ...
    max_length, stride, room = 16, 4, 11
    starts = [w.offsets[w.context_start][0] for w in qa_windows(tok, question, context, max_length, stride)]
    assert starts[:4] == [0, 7, 14, 21]

    def windows_with(chars):
        windows = qa_windows(tok, question, context, max_length, stride, answer=chars)
        return [(k, w.start_position - w.context_start, w.end_position - w.context_start)
                for k, w in enumerate(windows) if w.has_answer], windows

    # Ends exactly on window 0's last context token: inside window 0 only (window 1 starts at 7).
    found, _ = windows_with((5, room))
    assert found == [(0, 5, room - 1)]
    # Starts exactly on window 1's first context token and ends on its last one.
    found, _ = windows_with((7, 7 + room))
    assert found == [(1, 0, room - 1)]
    # Inside the overlap of windows 0 and 1 (context tokens 7-10): in both.
    found, _ = windows_with((7, 11))
    assert found == [(0, 7, 10), (1, 0, 3)]
    # Crossing the end of window 0: only window 1 holds it whole; others say "not here" (position 0).
    found, windows = windows_with((9, 13))
    assert found == [(1, 2, 5)]
    assert all(w.start_position == w.end_position == 0 for k, w in enumerate(windows) if k != 1)
    # An answer of stride + 1 tokens is always whole in some window; one of stride + 2 may not be.
    for begin in range(len(context) - stride):
        assert windows_with((begin, begin + stride + 1))[0], begin
    assert not windows_with((6, 12))[0]  # tokens 6..11: past window 0's end, before window 1's start


@pytest.mark.parametrize("answer,occurrence", [("café", 0), ("café", 1), ("日本語", 0), ("jazz", 0), ("bread", 0)])
def test_best_span_across_windows(tokenizer, answer, occurrence):
    chars = span_of(CONTEXT, answer, occurrence)
    windows = qa_windows(tokenizer, "Which?", CONTEXT, max_length=24, stride=8, answer=chars)
    holding = [w for w in windows if w.has_answer]
    assert holding, "the answer is in no window"
    # Every window votes weakly for its first context token; the answer's window votes strongly.
    starts, ends = [], []
    for w in windows:
        s, e = torch.zeros(len(w.input_ids)), torch.zeros(len(w.input_ids))
        s[w.context_start], e[w.context_start] = 1.0, 1.0
        if w is holding[-1]:
            s[w.start_position], e[w.end_position] = 5.0, 5.0
        starts.append(s)
        ends.append(e)
    best = best_span(windows, starts, ends, CONTEXT)
    assert best.text == answer and best.chars == chars and CONTEXT[slice(*best.chars)] == answer


def test_best_span_constraints():
    tok = Tokenizer.train(TEXTS + [CONTEXT], "char")
    context = "0123456789"
    (window,) = qa_windows(tok, "what?", context, max_length=64, stride=4)
    c0 = window.context_start
    n = len(window.input_ids)
    # Huge logits on question/special tokens and padding are ignored: context tokens only.
    starts, ends = torch.zeros(n + 3), torch.zeros(n + 3)
    starts[0] = ends[0] = starts[2] = ends[2] = starts[-1] = ends[-1] = 100.0
    starts[c0 + 3], ends[c0 + 5] = 2.0, 2.0
    assert best_span([window], starts[None], ends[None], context) == ("345", 4.0, (3, 6))
    # start <= end: an end before the start is not a span.
    starts, ends = torch.zeros(n), torch.zeros(n)
    starts[c0 + 6], ends[c0 + 2], ends[c0 + 7] = 3.0, 3.0, 1.0
    assert best_span([window], [starts], [ends], context).text == "67"
    # The longest answer: max_answer_tokens.
    starts, ends = torch.zeros(n), torch.zeros(n)
    starts[c0 + 0], ends[c0 + 9], ends[c0 + 2] = 3.0, 3.0, 1.0
    assert best_span([window], [starts], [ends], context, max_answer_tokens=10).text == "0123456789"
    assert best_span([window], [starts], [ends], context, max_answer_tokens=3).text == "012"
    # An empty context has no answer.
    (empty,) = qa_windows(tok, "what?", "", max_length=64, stride=4)
    assert empty.context_start == empty.context_end
    assert best_span([empty], [torch.zeros(8)], [torch.zeros(8)], "") == ("", float("-inf"), (0, 0))


def test_bpe_leading_space_is_trimmed():
    tok = Tokenizer.train(TEXTS, "bpe", vocab_size=300)
    context = "The quick brown fox jumps over the lazy dog."
    (window,) = qa_windows(tok, "Who?", context, max_length=64, stride=4, answer=span_of(context, "brown fox"))
    first = window.offsets[window.start_position]
    assert context[first[0]:first[1]].startswith(" ")  # the token carries the space before the answer
    best = best_span([window], *one_hot_logits(window, window.start_position, window.end_position), context)
    assert best.text == "brown fox" and best.chars == span_of(context, "brown fox")


def test_errors(tokenizer):
    with pytest.raises(DataError, match="question is .* tokens long, which leaves no room"):
        qa_windows(tokenizer, "Why " * 40, CONTEXT, max_length=32, stride=4)
    with pytest.raises(ConfigError, match="stride 20 must be"):
        qa_windows(tokenizer, "Why?", CONTEXT, max_length=24, stride=20)
    qa_windows(tokenizer, "Why?", "short", max_length=24, stride=20)  # one window: the stride does not matter
    with pytest.raises(DataError, match="not a non-empty span"):
        qa_windows(tokenizer, "Why?", CONTEXT, max_length=64, stride=4, answer=(5, 5))
    with pytest.raises(DataError, match="not a non-empty span"):
        qa_windows(tokenizer, "Why?", CONTEXT, max_length=64, stride=4, answer=(5, len(CONTEXT) + 1))


def test_folded_ids_ignore_case_and_leading_spaces():
    text = "Paris is big. paris, Paris and PARIS again: 日本語 and 日本"
    tokenizer = Tokenizer.train([text] * 20, "bpe", vocab_size=300)
    V = tokenizer.vocab_size
    ids = folded_ids(tokenizer, V + 4)
    assert ids.shape == (V + 4,) and ids[-4:].tolist() == list(range(V, V + 4))  # ids past the tokenizer's
    words = {text: tokenizer.encode(text) for text in ("Paris", " Paris", " paris")}
    assert all(len(encoded) == 1 for encoded in words.values()), words
    assert len({int(ids[encoded[0]]) for encoded in words.values()}) == 1
    assert ids[tokenizer.encode(" big")[0]] != ids[words["Paris"][0]]
    for special in tokenizer.special_ids:
        assert ids[special] == special
    pieces = [t for t in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([t])]
    assert pieces and all(ids[t] == t for t in pieces)  # byte-level pieces of a character match only themselves
    window = qa_windows(tokenizer, "Where?", "In Paris.", 32)[0]
    assert separator_id(tokenizer) == window.input_ids[1 + len(tokenizer.encode("Where?"))]

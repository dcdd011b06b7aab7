"""Metrics agree with the reference libraries and with the official SQuAD v1.1 definitions."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score

from lmforge.errors import DataError
from lmforge.evaluation import (
    accuracy,
    bleu,
    chrf,
    distinct_n,
    exact_match,
    macro_f1,
    normalize_answer,
    rouge,
    self_bleu,
    squad_scores,
    token_f1,
    vocabulary_coverage,
)

HYPOTHESES = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "functions are defined with the def statement",
    "",
    "Running dogs ran quickly.",
]
REFERENCES = [
    "the cat is sitting on the mat",
    "the quick brown fox jumped over a lazy dog",
    "a function is defined by a def statement",
    "nothing was generated",
    "The dog runs quickly!",
]
SECOND_REFERENCES = [
    "there is a cat on the mat",
    "a fast brown fox leaps over the lazy dog",
    "def statements define functions",
    "empty",
    "dogs running fast",
]


# ------------------------------------------------------------------------------------------
# BLEU, chrF, ROUGE against the libraries
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 5])
def test_bleu_and_chrf_match_sacrebleu(n):
    hyps, refs = HYPOTHESES[:n], REFERENCES[:n]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 <= bleu(hyps, refs) <= 100 and 0 <= chrf(hyps, refs) <= 100


def test_bleu_and_chrf_with_several_references():
    lists = [[a, b] for a, b in zip(REFERENCES, SECOND_REFERENCES)]
    streams = [REFERENCES, SECOND_REFERENCES]
    assert bleu(HYPOTHESES, lists) == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, streams).score)
    assert chrf(HYPOTHESES, lists) == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, streams).score)
    assert bleu(HYPOTHESES, lists) > bleu(HYPOTHESES, REFERENCES)  # more references can only help here
    # Lists of different lengths: missing references are None for sacrebleu.
    ragged = [[REFERENCES[0], SECOND_REFERENCES[0]], [REFERENCES[1]]]
    expected = sacrebleu.corpus_bleu(HYPOTHESES[:2], [REFERENCES[:2], [SECOND_REFERENCES[0], None]]).score
    assert bleu(HYPOTHESES[:2], ragged) == pytest.approx(expected)


def test_bleu_perfect_and_options():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    lower = bleu(["THE CAT SAT ON THE MAT"], ["the cat sat on the mat"], lowercase=True)
    assert lower == pytest.approx(100.0)
    assert chrf(HYPOTHESES, REFERENCES, word_order=2) == pytest.approx(
        sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES], word_order=2).score)


@pytest.mark.parametrize("n", [1, 5])
def test_rouge_matches_rouge_score(n):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(HYPOTHESES[:n], REFERENCES[:n])]
    result = rouge(HYPOTHESES[:n], REFERENCES[:n])
    assert set(result) == {"rouge1", "rouge2", "rougeL"}
    for name in result:
        assert result[name] == pytest.approx(100 * sum(s[name].fmeasure for s in scores) / n)


def test_rouge_stems_and_takes_the_best_reference():
    assert rouge(["the cats are running"], ["the cat is running"])["rouge1"] > \
        rouge(["the cats are running"], ["the cat is running"], use_stemmer=False)["rouge1"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    lists = [[a, b] for a, b in zip(REFERENCES, SECOND_REFERENCES)]
    result = rouge(HYPOTHESES, lists)
    for name in result:
        best = [scorer.score_multi(refs, h)[name].fmeasure for h, refs in zip(HYPOTHESES, lists)]
        assert result[name] == pytest.approx(100 * sum(best) / len(best))


@pytest.mark.parametrize("metric", [bleu, chrf, rouge])
def test_generation_metrics_reject_bad_input(metric):
    with pytest.raises(DataError, match="no hypotheses"):
        metric([], [])
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(DataError, match="single string"):
        metric("a b", "a b")
    with pytest.raises(DataError, match="non-empty list"):
        metric(["a"], [[]])


# ------------------------------------------------------------------------------------------
# SQuAD, by hand from the official v1.1 definitions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower.", "eiffel tower"),
    ("  an   apple, A pear and THE plum!  ", "apple pear and plum"),
    ("theory of anarchy", "theory of anarchy"),   # articles only as whole words
    ("U.S.A.", "usa"),
    ("a", ""),
    ("", ""),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_by_hand():
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("Denver Broncos", ["Carolina Panthers", "denver broncos!"]) == 1.0
    assert exact_match("", ["Denver"]) == 0.0
    assert exact_match("the", "a") == 1.0  # both normalise to the empty string (as in the official script)
    assert exact_match("1,000", ["1000"]) == 1.0  # punctuation goes


def test_token_f1_by_hand():
    # prediction tokens: cat sat on mat (4); gold: cat on mat (3); 3 in common
    precision, recall = 3 / 4, 3 / 3
    assert token_f1("The cat sat on a mat.", "a cat on the mat") == pytest.approx(
        2 * precision * recall / (precision + recall))
    # repeated tokens count with multiplicity: "b b c" vs "b c" share 2 tokens: P 2/3, R 1
    assert token_f1("b b c", "b c") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    # the best of several gold answers
    assert token_f1("blue car", ["red car", "blue car"]) == 1.0
    assert token_f1("blue car", ["red car", "green car"]) == pytest.approx(0.5)
    assert token_f1("", ["Denver"]) == 0.0
    assert token_f1("the", ["a"]) == 0.0  # nothing left to share, unlike exact match
    assert token_f1("Paris", ["London"]) == 0.0


def test_squad_scores_are_percentages():
    predictions = ["Eiffel Tower", "blue", ""]
    answers = [{"the Eiffel Tower"}, ["blue car", "the sky"], ["nothing"]]
    scores = squad_scores(predictions, [list(a) for a in answers])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 * 1 * 0.5 / 1.5 + 0) / 3)
    assert squad_scores(["x"], ["x"]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_rejects_bad_input():
    with pytest.raises(DataError, match="no gold answers"):
        exact_match("a", [])
    with pytest.raises(DataError, match="no gold answers"):
        token_f1("a", [])
    with pytest.raises(DataError, match="no hypotheses"):
        squad_scores([], [])
    with pytest.raises(DataError, match="1 hypotheses but 2"):
        squad_scores(["a"], [["a"], ["b"]])


# ------------------------------------------------------------------------------------------
# Classification against scikit-learn
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("predictions, references", [
    ([1, 0, 1, 1, 0, 2], [1, 0, 0, 1, 2, 2]),
    (["pos", "neg", "pos", "pos"], ["pos", "pos", "neg", "pos"]),
    (["a", "a", "a"], ["a", "b", "c"]),  # classes never predicted score 0
    ([3, 3], [3, 3]),
])
def test_accuracy_and_macro_f1_match_sklearn(predictions, references):
    assert accuracy(predictions, references) == pytest.approx(accuracy_score(references, predictions))
    assert macro_f1(predictions, references) == pytest.approx(
        f1_score(references, predictions, average="macro", zero_division=0))
    assert 0 <= accuracy(predictions, references) <= 1 and 0 <= macro_f1(predictions, references) <= 1


def test_classification_by_hand_and_errors():
    assert accuracy(["a", "b", "b", "a"], ["a", "b", "a", "a"]) == 0.75
    # a: P 1, R 2/3 -> 0.8; b: P 1/2, R 1 -> 2/3; mean 11/15
    assert macro_f1(["a", "b", "b", "a"], ["a", "b", "a", "a"]) == pytest.approx((0.8 + 2 / 3) / 2)
    assert macro_f1(["a", "a"], ["a", "a"], labels=["a", "b"]) == pytest.approx(0.5)
    with pytest.raises(DataError):
        accuracy([], [])
    with pytest.raises(DataError):
        macro_f1(["a"], ["a", "b"])


# ------------------------------------------------------------------------------------------
# Diversity
# ------------------------------------------------------------------------------------------
def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> 3 distinct of 6; bigrams: ab ba ab | ac -> 3 distinct of 4 (none across texts)
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["x y z"], 3) == 1.0
    assert distinct_n(["x y", "x y"], 3) == 0.0  # no trigram at all
    assert distinct_n(["", "  "], 1) == 0.0
    with pytest.raises(DataError, match="at least 1"):
        distinct_n([], 1)
    with pytest.raises(DataError, match="n >= 1"):
        distinct_n(["a"], 0)


def test_self_bleu_by_hand_and_against_sacrebleu():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four"]) == pytest.approx(0.0)
    texts = HYPOTHESES
    expected = sum(sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:]).score for i, t in enumerate(texts))
    assert self_bleu(texts) == pytest.approx(expected / len(texts))
    with pytest.raises(DataError, match="at least 2"):
        self_bleu(["only one"])


def test_vocabulary_coverage_by_hand():
    assert vocabulary_coverage([[1, 2, 2], [3], []], 10) == pytest.approx(0.3)
    assert vocabulary_coverage([[0, 1, 2, 3]], 4) == 1.0
    assert vocabulary_coverage([[]], 4) == 0.0
    with pytest.raises(DataError, match="outside"):
        vocabulary_coverage([[10]], 10)
    with pytest.raises(DataError, match="no generated"):
        vocabulary_coverage([], 10)

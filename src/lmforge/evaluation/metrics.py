"""Evaluation metrics: pure functions on strings and token ids, wrapping the reference libraries.

BLEU and chrF come from ``sacrebleu``, ROUGE from Google's ``rouge-score``, accuracy and macro-F1 from
scikit-learn, so scores are comparable with published numbers. Only SQuAD's answer normalisation is
written here, because the official evaluation script *is* its definition (SQuAD v1.1 ``evaluate-v1.1.py``:
lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace).

Scales (the conventions of the libraries and the official scripts):

=============================================  =================================================
0-100                                          0-1
=============================================  =================================================
:func:`bleu`, :func:`chrf`, :func:`self_bleu`  :func:`accuracy`, :func:`macro_f1`
:func:`rouge` (rouge1, rouge2, rougeL)         :func:`distinct_n`, :func:`vocabulary_coverage`
:func:`squad_scores` (exact_match, f1)         per-example :func:`exact_match`, :func:`token_f1`
=============================================  =================================================

(The per-example SQuAD functions return 0-1 like the official script's ``exact_match_score`` and
``f1_score``; the corpus-level :func:`squad_scores` averages them and multiplies by 100, as the script
does.)

Empty inputs (no hypotheses, no gold answers, mismatched lengths) raise :class:`DataError`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from functools import lru_cache
from typing import Any

from lmforge.errors import DataError

References = Sequence[str] | Sequence[Sequence[str]]

__all__ = ["accuracy", "bleu", "chrf", "distinct_n", "exact_match", "macro_f1", "normalize_answer", "rouge",
           "self_bleu", "squad_scores", "token_f1", "vocabulary_coverage"]


# ------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------
def _check_pairs(what: str, hypotheses: Sequence[Any], references: Sequence[Any]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise DataError(f"{what}: give lists of texts, not a single string")
    if len(hypotheses) == 0:
        raise DataError(f"{what}: no hypotheses to score")
    if len(hypotheses) != len(references):
        raise DataError(f"{what}: {len(hypotheses)} hypotheses but {len(references)} references; "
                        f"give one reference (or one list of references) per hypothesis")


def _reference_lists(what: str, hypotheses: Sequence[str], references: References) -> list[list[str]]:
    """One list of reference strings per hypothesis (a plain string becomes a list of one)."""
    _check_pairs(what, hypotheses, references)
    lists = []
    for number, ref in enumerate(references, 1):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{what}: reference {number} must be a string or a non-empty list of strings")
        lists.append(refs)
    if not all(isinstance(h, str) for h in hypotheses):
        raise DataError(f"{what}: hypotheses must be strings")
    return lists


def _reference_streams(lists: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position, ``None`` where an item has fewer."""
    width = max(len(refs) for refs in lists)
    return [[refs[k] if k < len(refs) else None for refs in lists] for k in range(width)]


# ------------------------------------------------------------------------------------------
# Generation: BLEU, chrF, ROUGE (0-100)
# ------------------------------------------------------------------------------------------
def bleu(hypotheses: Sequence[str], references: References, **options: Any) -> float:
    """Corpus BLEU (sacrebleu's ``corpus_bleu``, default 13a tokenisation and exp smoothing), 0-100.

    ``references``: one string per hypothesis, or one list of strings per hypothesis (several
    references; the lists may differ in length). ``options`` go to ``sacrebleu.corpus_bleu``."""
    import sacrebleu

    lists = _reference_lists("BLEU", hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(lists), **options).score)


def chrf(hypotheses: Sequence[str], references: References, **options: Any) -> float:
    """Corpus chrF (sacrebleu's ``corpus_chrf``: character 6-grams, beta 2), 0-100. ``word_order=2``
    in ``options`` gives chrF++."""
    import sacrebleu

    lists = _reference_lists("chrF", hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), _reference_streams(lists), **options).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge(hypotheses: Sequence[str], references: References, use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (``rouge-score``, Porter stemming), 0-100:
    ``{"rouge1", "rouge2", "rougeL"}``. With several references an item takes the best one
    (``RougeScorer.score_multi``). rouge-score's tokenizer keeps only ASCII letters and digits."""
    lists = _reference_lists("ROUGE", hypotheses, references)
    scorer = _rouge_scorer(use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, refs in zip(hypotheses, lists):
        scores = scorer.score(refs[0], hyp) if len(refs) == 1 else scorer.score_multi(refs, hyp)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(lists) for name, total in totals.items()}


# ------------------------------------------------------------------------------------------
# Question answering: SQuAD v1.1 definitions
# ------------------------------------------------------------------------------------------
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lowercase, remove punctuation, remove the articles
    a/an/the, collapse whitespace (in that order, as in the official script)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _answers(answers: str | Sequence[str]) -> list[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise DataError("an example has no gold answers to compare with")
    if not all(isinstance(a, str) for a in answers):
        raise DataError("gold answers must be strings")
    return answers


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(a) for a in _answers(answers)))


def _f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Bag-of-tokens F1 between the normalised prediction and gold answer, the best over the
    gold answers (0-1)."""
    return max(_f1(prediction, a) for a in _answers(answers))


def squad_scores(predictions: Sequence[str], answers_lists: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus SQuAD scores in percent, as the official script prints them: ``{"exact_match", "f1"}``."""
    _check_pairs("SQuAD scores", predictions, answers_lists)
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers_lists))
    f1 = sum(token_f1(p, a) for p, a in zip(predictions, answers_lists))
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}


# ------------------------------------------------------------------------------------------
# Classification (0-1)
# ------------------------------------------------------------------------------------------
def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Share of predictions equal to the reference label (``sklearn.metrics.accuracy_score``), 0-1."""
    from sklearn.metrics import accuracy_score

    _check_pairs("accuracy", predictions, references)
    return float(accuracy_score(list(references), list(predictions)))


def macro_f1(predictions: Sequence[Hashable], references: Sequence[Hashable],
             labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean of the per-class F1 scores (``sklearn.metrics.f1_score(average="macro")``), 0-1.

    Classes are those in ``labels`` if given, else every label in the references or the predictions;
    a class never predicted nor present scores 0 (``zero_division=0``)."""
    from sklearn.metrics import f1_score

    _check_pairs("macro-F1", predictions, references)
    return float(f1_score(list(references), list(predictions), labels=None if labels is None else list(labels),
                          average="macro", zero_division=0))


def multi_label_f1(predicted: Sequence[Sequence[bool]], gold: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Micro- and macro-averaged F1 (0-1) of multi-label predictions given as 0/1 rows (N, L)
    (``sklearn.metrics.f1_score`` on the indicator matrices; a label never predicted nor present
    scores 0)."""
    from sklearn.metrics import f1_score

    _check_pairs("multi-label F1", predicted, gold)
    return {average + "_f1": float(f1_score(list(gold), list(predicted), average=average, zero_division=0))
            for average in ("micro", "macro")}


# ------------------------------------------------------------------------------------------
# Open-ended generation: diversity (distinct-n, coverage 0-1; self-BLEU 0-100)
# ------------------------------------------------------------------------------------------
def _texts(what: str, texts: Sequence[str], minimum: int = 1) -> list[str]:
    if isinstance(texts, str):
        raise DataError(f"{what}: give a list of texts, not a single string")
    texts = list(texts)
    if len(texts) < minimum:
        raise DataError(f"{what} needs at least {minimum} text{'s' if minimum > 1 else ''}, got {len(texts)}")
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{what}: texts must be strings")
    return texts


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams, over the whitespace tokens of
    all ``texts`` together (n-grams do not cross texts), 0-1. 0.0 when the texts hold no n-gram."""
    if n < 1:
        raise DataError(f"distinct-n needs n >= 1, not {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in _texts("distinct-n", texts):
        tokens = text.split()
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def self_bleu(texts: Sequence[str]) -> float:
    """Self-BLEU (Zhu et al., 2018): the mean sentence BLEU (sacrebleu) of each text against all the
    others as references, 0-100; higher means less diverse."""
    from sacrebleu.metrics import BLEU

    texts = _texts("self-BLEU", texts, minimum=2)
    metric = BLEU(effective_order=True)  # sacrebleu's sentence_bleu defaults
    total = 0.0
    for i, text in enumerate(texts):
        total += metric.sentence_score(text, texts[:i] + texts[i + 1:]).score
    return total / len(texts)


def vocabulary_coverage(token_id_lists: Sequence[Sequence[int]], vocab_size: int) -> float:
    """Share of the vocabulary produced at least once over all the token id lists, 0-1."""
    if vocab_size < 1:
        raise DataError(f"vocabulary size must be positive, not {vocab_size}")
    if len(token_id_lists) == 0:
        raise DataError("vocabulary coverage: no generated token lists")
    produced = {int(t) for ids in token_id_lists for t in ids}
    outside = [t for t in produced if not 0 <= t < vocab_size]
    if outside:
        raise DataError(f"vocabulary coverage: token id {outside[0]} is outside a vocabulary of {vocab_size}")
    return len(produced) / vocab_size


def word_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate (word edits / reference words, jiwer), as a fraction; texts are
    compared lowercased with punctuation removed and spaces collapsed."""
    import jiwer

    _check_pairs("word error rate", hypotheses, references)
    return float(jiwer.wer([_speech_form(r) for r in references], [_speech_form(h) for h in hypotheses]))


def character_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate (jiwer), as a fraction, on the same normalised texts as the WER."""
    import jiwer

    _check_pairs("character error rate", hypotheses, references)
    return float(jiwer.cer([_speech_form(r) for r in references], [_speech_form(h) for h in hypotheses]))


def _speech_form(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed; an empty text becomes one space (jiwer
    refuses empty references and counts an empty hypothesis as all deletions either way)."""
    words = re.sub(r"[^\w\s']", " ", text.lower()).split()
    return " ".join(words) or " "

"""Paired significance: McNemar's exact p-values by hand, bootstrap intervals against the normal
approximation, and the errors promised."""

from __future__ import annotations

import math
import random

import pytest

from lmforge.errors import DataError
from lmforge.evaluation import accuracy, macro_f1, mcnemar, paired_bootstrap

GOLD = [k % 3 for k in range(300)]


def with_errors(gold: list[int], wrong: set[int]) -> list[int]:
    """``gold`` with the examples in ``wrong`` mislabelled (the next class)."""
    return [(y + 1) % 3 if k in wrong else y for k, y in enumerate(gold)]


def test_identical_predictions_differ_by_exactly_zero():
    predictions = with_errors(GOLD, set(range(0, 300, 4)))
    diff = paired_bootstrap(accuracy, predictions, list(predictions), GOLD)
    assert (diff.difference, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert not diff.significant
    assert mcnemar(predictions, predictions, GOLD) == 1.0


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_examples():
    a = with_errors(GOLD, set(range(10)) | {50, 51, 52})    # wrong on 0-9, and on 50-52
    b = with_errors(GOLD, {0, 1, 50, 51, 52})               # wrong on 0-1 (right on 2-9), and on 50-52
    # discordant: 8 examples only B gets right, none only A: p = 2 * 0.5^8
    assert mcnemar(a, b, GOLD) == pytest.approx(2 * 0.5 ** 8)
    c = with_errors(GOLD, {0, 1, 50, 51, 52, 100, 101})     # only C right on 2-9, only A right on 100-101
    tail = sum(math.comb(10, k) for k in range(3)) / 2 ** 10  # P(X <= 2), X ~ Binomial(10, 1/2)
    assert mcnemar(a, c, GOLD) == pytest.approx(2 * tail)
    assert mcnemar(c, a, GOLD) == pytest.approx(2 * tail)  # symmetric


def test_a_clear_gain_has_an_interval_like_the_normal_approximation_and_is_significant():
    rng = random.Random(0)
    a = with_errors(GOLD, set(rng.sample(range(300), 90)))   # 70% right
    b = list(GOLD)                                           # always right
    diff = paired_bootstrap(accuracy, a, b, GOLD, resamples=2000)
    assert diff.difference == pytest.approx(0.30)
    half_width = 1.96 * math.sqrt(0.3 * 0.7 / 300)           # the per-example gain is Bernoulli(0.3)
    assert diff.low == pytest.approx(0.30 - half_width, abs=0.015)
    assert diff.high == pytest.approx(0.30 + half_width, abs=0.015)
    assert diff.significant and diff.low > 0
    assert mcnemar(a, b, GOLD) < 1e-20


def test_equally_good_models_with_different_errors_are_not_significant():
    a = with_errors(GOLD, set(range(0, 300, 10)))
    b = with_errors(GOLD, set(range(5, 300, 10)))
    diff = paired_bootstrap(accuracy, a, b, GOLD)
    assert diff.difference == 0.0 and diff.low < 0 < diff.high and not diff.significant
    assert mcnemar(a, b, GOLD) == 1.0


def test_any_corpus_metric_macro_f1_included_and_the_seed_fixes_the_interval():
    a = with_errors(GOLD, set(range(0, 300, 3)))   # every error on class 0
    b = with_errors(GOLD, set(range(1, 300, 6)))
    diff = paired_bootstrap(macro_f1, a, b, GOLD, resamples=300, seed=3)
    assert diff.difference == pytest.approx(macro_f1(b, GOLD) - macro_f1(a, GOLD))
    assert diff.low <= diff.difference <= diff.high
    assert diff == paired_bootstrap(macro_f1, a, b, GOLD, resamples=300, seed=3)


def test_bad_input_raises_data_error():
    with pytest.raises(DataError, match="2 and 3 predictions for 3 gold labels"):
        paired_bootstrap(accuracy, [0, 1], [0, 1, 2], [0, 1, 2])
    with pytest.raises(DataError, match="no test examples"):
        mcnemar([], [], [])
    with pytest.raises(DataError, match="resamples >= 2"):
        paired_bootstrap(accuracy, [0, 1], [1, 1], [0, 1], resamples=1)

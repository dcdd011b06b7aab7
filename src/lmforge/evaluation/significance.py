"""Is model B really better than model A on this test set? Paired significance of a metric difference.

Both models labelled the same test examples, so their scores are compared example by example:

- :func:`paired_bootstrap`: the difference ``metric(B) - metric(A)`` and its percentile confidence
  interval over test sets resampled with replacement, the same resample for both models
  (``scipy.stats.bootstrap`` with ``paired=True``; Koehn 2004 for MT, Berg-Kirkpatrick et al. 2012).
  Works for any corpus metric, macro-F1 included.
- :func:`mcnemar`: McNemar's exact test on the examples exactly one model got right (a two-sided
  binomial test of those discordant pairs, ``scipy.stats.binomtest``): the p-value of "same accuracy".

>>> diff = paired_bootstrap(accuracy, baseline_predictions, our_predictions, gold)
>>> diff.difference, diff.low, diff.high   # e.g. 0.0022, -0.0087, 0.0130: not significant
>>> mcnemar(baseline_predictions, our_predictions, gold)  # e.g. 0.71
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from lmforge.errors import DataError

Metric = Callable[[Sequence[Hashable], Sequence[Hashable]], float]

__all__ = ["PairedDifference", "mcnemar", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """``metric(B) - metric(A)`` on the test set, and its ``confidence`` interval [low, high]."""

    difference: float
    low: float
    high: float
    confidence: float

    @property
    def significant(self) -> bool:
        """Whether the interval leaves out 0 (B better, or worse, beyond resampling noise)."""
        return self.low > 0 or self.high < 0


def _check(predictions_a: Sequence[Hashable], predictions_b: Sequence[Hashable], gold: Sequence[Hashable]) -> None:
    if not len(gold):
        raise DataError("paired comparison: no test examples")
    if not len(predictions_a) == len(predictions_b) == len(gold):
        raise DataError(f"paired comparison: {len(predictions_a)} and {len(predictions_b)} predictions for "
                        f"{len(gold)} gold labels; give both models' predictions on every test example")


def paired_bootstrap(metric: Metric, predictions_a: Sequence[Hashable], predictions_b: Sequence[Hashable],
                     gold: Sequence[Hashable], resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """``metric(predictions_b, gold) - metric(predictions_a, gold)`` with a paired percentile bootstrap
    interval: each of ``resamples`` test sets draws len(gold) examples with replacement, and both models
    are scored on that same draw. ``metric`` is any corpus metric ``(predictions, gold) -> float``
    (:func:`~lmforge.evaluation.metrics.accuracy`, :func:`~lmforge.evaluation.metrics.macro_f1`, ...)."""
    import numpy as np
    from scipy.stats import bootstrap

    _check(predictions_a, predictions_b, gold)
    if resamples < 2 or not 0 < confidence < 1:
        raise DataError(f"paired bootstrap: need resamples >= 2 and 0 < confidence < 1, not {resamples} and "
                        f"{confidence}")
    a, b, g = (np.asarray(list(x), dtype=object) for x in (predictions_a, predictions_b, gold))

    def difference(rows: np.ndarray) -> float:
        return metric(list(b[rows]), list(g[rows])) - metric(list(a[rows]), list(g[rows]))

    everything = np.arange(len(g))
    if all(x == y for x, y in zip(a, b)):  # identical predictions: every resample differs by exactly 0
        return PairedDifference(0.0, 0.0, 0.0, confidence)
    result = bootstrap((everything,), difference, vectorized=False, n_resamples=resamples,
                       confidence_level=confidence, method="percentile", random_state=seed)
    interval = result.confidence_interval
    return PairedDifference(difference(everything), float(interval.low), float(interval.high), confidence)


def mcnemar(predictions_a: Sequence[Hashable], predictions_b: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """Two-sided exact McNemar p-value that A and B are equally accurate: of the examples exactly one
    of them got right, B's share is tested against 1/2 (1.0 when there are none)."""
    from scipy.stats import binomtest

    _check(predictions_a, predictions_b, gold)
    only_b = sum(a != y and b == y for a, b, y in zip(predictions_a, predictions_b, gold))
    only_a = sum(a == y and b != y for a, b, y in zip(predictions_a, predictions_b, gold))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_b, only_a + only_b, 0.5).pvalue)

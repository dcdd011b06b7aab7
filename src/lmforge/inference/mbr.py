"""Minimum Bayes risk (MBR) decoding: of several candidate outputs for one input, the one that agrees
most with the others.

Beam search returns the single most probable output, which is not the output that scores best on
average. MBR (Kumar & Byrne 2004; for neural translation Eikema & Aziz 2020, Freitag et al. 2022) treats
the candidates as samples of what the model believes and picks the candidate with the highest mean
utility (sentence BLEU or chrF, from ``sacrebleu``) against every other candidate as the reference:
a consensus output. Used on a beam's hypotheses (``translate(..., beam_size=8, mbr="bleu")``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.errors import ConfigError

UTILITIES = ("bleu", "chrf")


def check_utility(utility: str) -> str:
    """``utility`` if it is one of :data:`UTILITIES`, else a :class:`ConfigError`."""
    if utility not in UTILITIES:
        raise ConfigError(f"mbr must be one of {', '.join(UTILITIES)}, not {utility!r}")
    return utility


def mbr_choose(candidates: Sequence[str], utility: str = "bleu") -> int:
    """Index of the candidate whose mean ``utility`` against the other candidates (as references) is the
    highest; the earliest wins a tie, so candidates ordered best first fall back to the model's choice.
    Duplicates count once per copy (a hypothesis the beam found twice is twice as supported)."""
    check_utility(utility)
    if len(candidates) < 3:  # with two candidates each is the other's only reference: nothing to vote
        return 0
    import sacrebleu

    metric = sacrebleu.BLEU(effective_order=True) if utility == "bleu" else sacrebleu.CHRF()
    best, best_gain = 0, float("-inf")
    for i, hypothesis in enumerate(candidates):
        gain = sum(metric.sentence_score(hypothesis, [reference]).score
                   for j, reference in enumerate(candidates) if j != i)
        if gain > best_gain:
            best, best_gain = i, gain
    return best

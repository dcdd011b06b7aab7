"""Logits processors and the next-token pick (lmforge.inference.sampling), checked against Hugging Face."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.errors import ConfigError
from lmforge.inference.sampling import (
    SamplingConfig,
    apply_count_penalties,
    apply_repetition_penalty,
    filter_logits,
    pick_next,
)

B, V = 16, 50


def random_logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g, dtype=torch.float64) * scale


def random_history(seed: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous tokens (B, L) and the matching (B, V) "seen" mask."""
    g = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(0, V, (B, length), generator=g)
    seen = torch.zeros(B, V, dtype=torch.bool).scatter(1, ids, True)
    return ids, seen


def hf_pipeline(config: SamplingConfig) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None:
        processors.append(TopPLogitsWarper(config.top_p))
    if config.min_p is not None:
        processors.append(MinPLogitsWarper(config.min_p))
    return processors


def assert_same_filtering(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    kept = torch.isfinite(ours)
    assert torch.equal(kept, torch.isfinite(theirs)), (kept ^ torch.isfinite(theirs)).nonzero()
    assert kept.any(dim=-1).all()  # at least one token always survives
    torch.testing.assert_close(ours[kept], theirs[kept])
    assert (ours[~kept] == float("-inf")).all()


# ------------------------------------------------------------------ against Hugging Face
@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_repetition_penalty_matches_hf(penalty, seed):
    logits = random_logits(seed)
    logits[:, 0] = 0.0  # a zero logit stays zero either way
    ids, seen = random_history(seed)
    ours = apply_repetition_penalty(logits.clone(), seen, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs)
    if penalty > 1.0:  # seen tokens got less likely, the others did not move
        assert (ours[seen] <= logits[seen]).all() and (ours[seen] < logits[seen]).any()
        assert torch.equal(ours[~seen], logits[~seen])


def test_repetition_penalty_does_not_modify_input():
    logits = random_logits(0)
    copy = logits.clone()
    _, seen = random_history(0)
    apply_repetition_penalty(logits, seen, 1.5)
    assert torch.equal(logits, copy)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("seed", range(3))
def test_temperature_matches_hf(temperature, seed):
    logits = random_logits(seed)
    config = SamplingConfig(temperature=temperature)
    ours = filter_logits(logits.clone(), config)
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("top_k", [1, 2, 5, 17, V - 1, V, V + 10])
@pytest.mark.parametrize("seed", range(3))
def test_top_k_matches_hf(top_k, seed):
    logits = random_logits(seed)
    config = SamplingConfig(top_k=top_k, temperature=0.8)
    ours = filter_logits(logits.clone(), config)
    theirs = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(0.8)(None, logits.clone()))
    assert_same_filtering(ours, theirs)
    assert (torch.isfinite(ours).sum(-1) == min(top_k, V)).all()


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_top_p_matches_hf(top_p, seed):
    logits = random_logits(seed)
    ours = filter_logits(logits.clone(), SamplingConfig(top_p=top_p))
    theirs = TopPLogitsWarper(top_p)(None, logits.clone())
    assert_same_filtering(ours, theirs)
    # the kept tokens are the most likely ones and hold at least top_p of the probability
    probs = logits.softmax(-1)
    kept = torch.isfinite(ours)
    assert (probs.masked_fill(~kept, 0).sum(-1) >= top_p - 1e-9).all()
    for row in range(B):
        dropped = probs[row][~kept[row]]
        if dropped.numel():
            assert probs[row][kept[row]].min() >= dropped.max()


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_min_p_matches_hf(min_p, seed):
    logits = random_logits(seed)
    ours = filter_logits(logits.clone(), SamplingConfig(min_p=min_p))
    theirs = MinPLogitsWarper(min_p)(None, logits.clone())
    assert_same_filtering(ours, theirs)


@pytest.mark.parametrize("settings", [
    {"temperature": 0.7, "top_k": 10, "top_p": 0.8},
    {"temperature": 1.3, "top_p": 0.6, "min_p": 0.05},
    {"temperature": 0.5, "top_k": 20, "top_p": 0.95, "min_p": 0.1, "repetition_penalty": 1.2},
    {"temperature": 2.0, "top_k": 3, "repetition_penalty": 0.8},
    {"temperature": 1.0, "min_p": 0.2, "repetition_penalty": 1.5},
])
@pytest.mark.parametrize("seed", range(4))
def test_whole_pipeline_matches_hf(settings, seed):
    config = SamplingConfig(**settings)
    config.validate()
    logits = random_logits(seed)
    ids, seen = random_history(seed)
    ours = filter_logits(apply_repetition_penalty(logits.clone(), seen, config.repetition_penalty), config)
    theirs = hf_pipeline(config)(ids, logits.clone())
    assert_same_filtering(ours, theirs)


# ------------------------------------------------------------------ picking
def test_greedy_when_temperature_is_zero():
    logits = random_logits(1).float()
    config = SamplingConfig(temperature=0.0)
    assert config.greedy
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(pick_next(logits, config, None, g), logits.argmax(-1))
    assert torch.equal(pick_next(logits, config, None, None), logits.argmax(-1))


def test_greedy_applies_repetition_penalty_first():
    logits = torch.tensor([[3.0, 2.9, -1.0], [-0.5, -0.6, -5.0]])
    seen = torch.tensor([[True, False, False], [True, False, False]])
    config = SamplingConfig(temperature=0.0, repetition_penalty=1.5)
    assert pick_next(logits, config, None, None).tolist() == [0, 0]
    assert pick_next(logits, config, seen, None).tolist() == [1, 1]


def test_greedy_ignores_filters_and_half_precision():
    logits = random_logits(2).to(torch.bfloat16)
    config = SamplingConfig(temperature=0.0, top_k=3, top_p=0.5, min_p=0.5)
    assert torch.equal(pick_next(logits, config, None, None), logits.float().argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = random_logits(3).float()
    config = SamplingConfig(temperature=1.0)

    def draws(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [pick_next(logits, config, None, g).tolist() for _ in range(10)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_sampling_stays_within_filtered_tokens():
    logits = random_logits(4).float()
    g = torch.Generator().manual_seed(0)
    config = SamplingConfig(temperature=1.5, top_k=3)
    allowed = torch.topk(logits, 3, dim=-1).indices
    picked_any = set()
    for _ in range(200):
        picks = pick_next(logits, config, None, g)
        assert (allowed == picks[:, None]).any(-1).all()
        picked_any.update(picks.tolist())
    assert len(picked_any) > B  # it does sample, not always the top token
    config = SamplingConfig(temperature=1.0, top_k=1)
    assert torch.equal(pick_next(logits, config, None, g), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    g = torch.Generator().manual_seed(0)
    config = SamplingConfig(temperature=1.0)
    counts = torch.bincount(torch.stack([pick_next(logits, config, None, g) for _ in range(4000)]).flatten(),
                            minlength=4)
    freqs = counts.double() / counts.sum()
    assert counts[3] == 0
    torch.testing.assert_close(freqs[:3], torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.03, rtol=0)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("overrides, name", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": 0.0}, "min_p"),
    ({"min_p": -0.2}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"num_samples": 0}, "num_samples"),
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
])
def test_sampling_config_validate_errors(overrides, name):
    config = dataclasses.replace(SamplingConfig(), **overrides)
    with pytest.raises(ConfigError, match=name):
        config.validate()


def test_sampling_config_valid_edges():
    SamplingConfig(max_new_tokens=0, temperature=0.0, top_k=1, top_p=1.0, min_p=1.0,
                   repetition_penalty=0.5, stop=["\n"], seed=0, num_samples=3, presence_penalty=-2.0,
                   frequency_penalty=2.0).validate()


# ------------------------------------------------------------------ presence and frequency penalties
@pytest.mark.parametrize("presence, frequency", [(0.0, 0.0), (1.5, 0.0), (0.0, 0.7), (-0.5, 2.0)])
def test_count_penalties_follow_openais_formula(presence, frequency):
    logits = random_logits(5)
    g = torch.Generator().manual_seed(9)
    counts = torch.randint(0, 4, (B, V), generator=g).to(torch.float64)
    ours = apply_count_penalties(logits, counts, presence, frequency)
    for row in range(B):  # mu[j] - c[j] * frequency - (c[j] > 0) * presence, element by element
        for j in range(V):
            c = counts[row, j].item()
            expected = logits[row, j].item() - c * frequency - (1.0 if c > 0 else 0.0) * presence
            assert ours[row, j].item() == pytest.approx(expected)


def test_greedy_pick_applies_count_penalties():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    counts = torch.tensor([[2.0, 0.0, 0.0]])
    pick = lambda **penalties: pick_next(logits, SamplingConfig(temperature=0, **penalties), None, None, counts)
    assert pick(frequency_penalty=0.2).item() == 0  # 3 - 2 * 0.2 = 2.6 > 2.5
    assert pick(frequency_penalty=0.3).item() == 1  # 3 - 2 * 0.3 = 2.4 < 2.5
    assert pick(presence_penalty=0.6).item() == 1   # 3 - 0.6 = 2.4 < 2.5

"""Reward- and preference-driven losses (lmforge.alignment.losses) against plain-Python references.

Every expected value here is computed with loops and :mod:`math` on small fixed tensors, never with the
functions under test; a few are also written out by hand. The last section checks that
``models.lora.adapters_disabled`` turns a LoRA model back into its frozen base exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.alignment.losses import (
    advantages_for,
    bradley_terry_loss,
    dpo_loss,
    dpo_metrics,
    entropy,
    frac_zero_std,
    group_advantages,
    kl_k3,
    leave_one_out_advantages,
    masked_mean,
    mean_baseline_advantages,
    policy_loss,
    sequence_logprobs,
)
from lmforge.config import LoraConfig, ModelConfig
from lmforge.errors import ConfigError
from lmforge.models.decoder import DecoderLM
from lmforge.models.lora import LoRALinear, adapters_disabled, apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend for the cores

REWARDS = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 5.0, 2.0, 2.0, 2.0, 2.0]  # three groups of 4, the last all equal


def close(actual, expected, tol: float = 1e-5) -> None:
    actual = actual.tolist() if isinstance(actual, torch.Tensor) else actual
    if isinstance(expected, (int, float)):
        assert actual == pytest.approx(expected, rel=tol, abs=tol)
    else:
        assert actual == pytest.approx(list(expected), rel=tol, abs=tol)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------
def ref_group_advantages(rewards: list[float], group: int, scale: bool = True, eps: float = 1e-4) -> list[float]:
    out = []
    for g in range(0, len(rewards), group):
        values = rewards[g:g + group]
        mean = sum(values) / group
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (group - 1)) if group > 1 else 0.0
        out += [(v - mean) / (std + eps) if scale else v - mean for v in values]
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_grpo_formula(scale):
    expected = ref_group_advantages(REWARDS, 4, scale)
    close(group_advantages(torch.tensor(REWARDS), 4, scale=scale), expected)
    # a group whose rewards are all equal teaches nothing: zero advantages, not NaN
    assert group_advantages(torch.tensor(REWARDS), 4, scale=scale)[8:].tolist() == [0.0] * 4


def test_group_advantages_by_hand():
    # [1, 3]: mean 2, Bessel std sqrt(2) -> -+1 / (sqrt(2) + 1e-4)
    close(group_advantages(torch.tensor([1.0, 3.0]), 2), [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])
    close(group_advantages(torch.tensor([1.0, 3.0]), 2, eps=0.5), [-1 / (math.sqrt(2) + 0.5), 1 / (math.sqrt(2) + 0.5)])
    # integer rewards are fine; a group of one has nothing to compare with
    close(group_advantages(torch.tensor([4, 7]), 1), [0.0, 0.0])


def test_leave_one_out_advantages():
    expected = []
    for g in range(0, len(REWARDS), 4):
        values = REWARDS[g:g + 4]
        for i, v in enumerate(values):
            others = [w for j, w in enumerate(values) if j != i]
            expected.append(v - sum(others) / len(others))
    close(leave_one_out_advantages(torch.tensor(REWARDS), 4), expected)
    close(leave_one_out_advantages(torch.tensor([1.0, 3.0]), 2), [-2.0, 2.0])  # by hand
    with pytest.raises(ConfigError, match="num_generations >= 2"):
        leave_one_out_advantages(torch.tensor(REWARDS), 1)


def test_mean_baseline_advantages():
    mean = sum(REWARDS) / len(REWARDS)
    close(mean_baseline_advantages(torch.tensor(REWARDS)), [r - mean for r in REWARDS])
    close(mean_baseline_advantages(torch.tensor([1, 2, 6])), [-2.0, -1.0, 3.0])


def test_advantages_for_dispatches_by_algorithm():
    rewards = torch.tensor(REWARDS)
    close(advantages_for("grpo", rewards, 4), ref_group_advantages(REWARDS, 4))
    close(advantages_for("grpo", rewards, 4, scale=False), ref_group_advantages(REWARDS, 4, scale=False))
    close(advantages_for("rloo", rewards, 4), leave_one_out_advantages(rewards, 4).tolist())
    close(advantages_for("reinforce", rewards, 4), [r - sum(REWARDS) / 12 for r in REWARDS])
    assert not torch.allclose(advantages_for("rloo", rewards, 4), advantages_for("grpo", rewards, 4))
    with pytest.raises(ConfigError, match="unknown algorithm 'ppo'"):
        advantages_for("ppo", rewards, 4)


def test_frac_zero_std():
    assert frac_zero_std(torch.tensor(REWARDS), 4) == pytest.approx(1 / 3)
    assert frac_zero_std(torch.tensor([1.0, 1.0, 0.0, 1.0, 3.0, 3.0]), 2) == pytest.approx(2 / 3)
    assert frac_zero_std(torch.tensor([0.0, 1.0]), 2) == 0.0


@pytest.mark.parametrize("call", [
    lambda r, g: group_advantages(r, g),
    lambda r, g: leave_one_out_advantages(r, g),
    lambda r, g: frac_zero_std(r, g),
    lambda r, g: advantages_for("grpo", r, g),
])
@pytest.mark.parametrize("group", [5, 0])
def test_a_group_that_does_not_divide_the_batch_is_a_config_error(call, group):
    with pytest.raises(ConfigError, match="does not divide 12 rewards|num_generations >= 2"):
        call(torch.tensor(REWARDS), group)


# ------------------------------------------------------------------------------------------
# Token log-probabilities
# ------------------------------------------------------------------------------------------
def fixed_logits(n: int = 2, t: int = 4, v: int = 5) -> torch.Tensor:
    return torch.randn(n, t, v, generator=torch.Generator().manual_seed(3)) * 2


def ref_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    total = math.log(sum(math.exp(x - top) for x in row)) + top
    return [x - total for x in row]


def test_sequence_logprobs_score_the_next_token():
    logits = fixed_logits()
    ids = torch.tensor([[0, 3, 1, 4], [2, 2, 0, 1]])
    expected = [[ref_log_softmax(logits[n, t].tolist())[ids[n, t + 1]] for t in range(3)] for n in range(2)]
    got = sequence_logprobs(logits, ids)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    for n in range(2):
        close(got[n], expected[n])
    # half-precision logits are scored in float32
    assert sequence_logprobs(logits.to(torch.bfloat16), ids).dtype == torch.float32


def test_entropy():
    logits = fixed_logits()
    got = entropy(logits)
    assert got.shape == (2, 4)
    for n in range(2):
        for t in range(4):
            logp = ref_log_softmax(logits[n, t].tolist())
            close(float(got[n, t]), -sum(math.exp(x) * x for x in logp))
    close(float(entropy(torch.zeros(1, 1, 7))[0, 0]), math.log(7))  # uniform: log V
    close(float(entropy(torch.tensor([[[0.0, -1e4]]]))[0, 0]), 0.0, tol=1e-4)  # certain: 0


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(values, mask), (1 + 2 + 4) / 3)
    close(masked_mean(values, mask.bool()), (1 + 2 + 4) / 3)
    close(masked_mean(values, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN


def test_kl_k3():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.2]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -2.5, -1.1]])
    got = kl_k3(logp, ref)
    for n in range(2):
        for t in range(3):
            d = float(ref[n, t]) - float(logp[n, t])
            close(float(got[n, t]), math.exp(d) - d - 1)
    assert float(got[0, 2]) == 0.0  # equal log-probabilities: no divergence
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    many = kl_k3(a, b)
    assert (many >= 0).all() and (many[(a - b).abs() > 1e-2] > 0).all()


# ------------------------------------------------------------------------------------------
# The clipped policy objective
# ------------------------------------------------------------------------------------------
# Ratios chosen to hit every branch: below 1 - eps, inside, above 1 + 0.2 but not above 1 + 0.28, above both.
RATIOS = [[0.5, 1.1, 1.25, 2.0],   # A > 0; the last token is padding
          [0.5, 0.9, 1.5, 0.3],    # A < 0; the last two are padding
          [0.7, 1.0, 1.25, 1.5]]   # A > 0
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
ADVANTAGES = [1.5, -0.7, 0.3]
LOGPROBS = [[-1.0, -2.0, -0.5, -1.5], [-0.3, -1.1, -2.2, -0.9], [-1.7, -0.2, -0.8, -2.5]]
REF = [[-1.2, -1.9, -0.9, -1.0], [-0.3, -1.6, -2.0, -0.4], [-1.1, -0.4, -0.8, -2.0]]


def policy_inputs(n: slice = slice(None)):
    logprobs = torch.tensor(LOGPROBS)
    old = logprobs - torch.log(torch.tensor(RATIOS))
    return (logprobs[n], old[n], torch.tensor(ADVANTAGES)[n], torch.tensor(MASK, dtype=torch.float32)[n],
            torch.tensor(REF)[n])


def ref_policy_loss(rows, loss_type, eps=0.2, eps_high=None, beta=0.0, L=None, step_tokens=None, grad_accum=1):
    """The module docstring's formula with loops: rows are (ratios, mask, advantage, logprobs, ref)."""
    high = eps if eps_high is None else eps_high
    per_row = []
    for ratios, mask, a, logps, refs in rows:
        values = []
        for r, m, lp, rf in zip(ratios, mask, logps, refs):
            if not m:
                continue
            clipped = min(max(r, 1 - eps), 1 + high)
            v = -min(r * a, clipped * a)
            if beta:
                d = rf - lp
                v += beta * (math.exp(d) - d - 1)
            values.append(v)
        per_row.append(values)
    tokens = sum(len(v) for v in per_row)
    total = sum(sum(v) for v in per_row)
    if loss_type == "grpo":
        return sum(sum(v) / max(len(v), 1) for v in per_row) / len(per_row)
    if loss_type == "bnpo":
        return total / max(tokens, 1)
    if loss_type == "dr_grpo":
        return total / (len(per_row) * L)
    return total * grad_accum / step_tokens


def rows(n: slice = slice(None)):
    return list(zip(RATIOS, MASK, ADVANTAGES, LOGPROBS, REF))[n]


TOKENS = sum(map(sum, MASK))  # 9
OPTIONS = {"grpo": {}, "bnpo": {}, "dr_grpo": {"max_completion_length": 6}, "dapo": {"step_tokens": 12.0}}


def ref_options(loss_type):
    return {"L": 6} if loss_type == "dr_grpo" else {"step_tokens": 12.0} if loss_type == "dapo" else {}


@pytest.mark.parametrize("loss_type", list(OPTIONS))
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_matches_ppo_clip_reference(loss_type, epsilon_high, beta):
    logprobs, old, adv, mask, ref = policy_inputs()
    out = policy_loss(logprobs, old, adv, mask, loss_type=loss_type, epsilon_high=epsilon_high, beta=beta,
                      ref_logprobs=ref, **OPTIONS[loss_type])
    expected = ref_policy_loss(rows(), loss_type, eps_high=epsilon_high, beta=beta, **ref_options(loss_type))
    close(float(out.loss), expected)
    assert out.loss.requires_grad is False and out.loss.shape == ()


def test_the_normalisations_differ_on_ragged_rows():
    """Rows of 3, 2 and 4 tokens: each loss_type divides differently, so the reference can tell them apart."""
    values = {t: ref_policy_loss(rows(), t, **ref_options(t)) for t in OPTIONS}
    assert len({round(v, 6) for v in values.values()}) == 4
    logprobs, old, adv, mask, _ = policy_inputs()
    for loss_type, value in values.items():
        close(float(policy_loss(logprobs, old, adv, mask, loss_type=loss_type, **OPTIONS[loss_type]).loss), value)


def test_policy_loss_by_hand():
    """One token each, eps 0.2: the pessimistic bound of PPO-clip."""
    def one(ratio, a, **options):
        lp = torch.tensor([[-1.0]])
        return float(policy_loss(lp, lp - math.log(ratio), torch.tensor([a]), torch.ones(1, 1),
                                 loss_type="bnpo", **options).loss)

    close(one(1.5, 2.0), -1.2 * 2.0)   # A > 0 above 1 + eps: clipped
    close(one(1.5, -2.0), 1.5 * 2.0)   # A < 0 above 1 + eps: not clipped (the worse value)
    close(one(0.5, -2.0), 0.8 * 2.0)   # A < 0 below 1 - eps: clipped
    close(one(0.5, 2.0), -0.5 * 2.0)   # A > 0 below 1 - eps: not clipped
    close(one(1.25, 2.0), -1.2 * 2.0)  # symmetric clip at 1.2 ...
    close(one(1.25, 2.0, epsilon_high=0.28), -1.25 * 2.0)  # ... DAPO's clip-higher lets 1.25 through
    close(one(1.5, 2.0, epsilon_high=0.28), -1.28 * 2.0)
    close(one(0.7, -2.0, epsilon=0.2, epsilon_high=0.28), 0.8 * 2.0)  # the low side keeps epsilon


def test_padding_does_not_matter():
    logprobs, old, adv, mask, ref = policy_inputs()
    changed_lp, changed_ref = logprobs.clone(), ref.clone()
    changed_lp[mask == 0] = -7.0
    changed_ref[mask == 0] = 3.0
    for loss_type, options in OPTIONS.items():
        a = policy_loss(logprobs, old, adv, mask, loss_type=loss_type, beta=0.1, ref_logprobs=ref, **options)
        b = policy_loss(changed_lp, old, adv, mask, loss_type=loss_type, beta=0.1, ref_logprobs=changed_ref, **options)
        close(float(a.loss), float(b.loss))
        assert (a.kl, a.clip_low, a.clip_high) == pytest.approx((b.kl, b.clip_low, b.clip_high))


@pytest.mark.parametrize("epsilon_high, high_tokens", [(None, 3), (0.28, 1)])
def test_clip_ratio_metrics(epsilon_high, high_tokens):
    # low: ratio < 0.8 with A < 0 -> row 1 token 0 only (row 0's 0.5 has A > 0; row 2's 0.7 has A > 0).
    # high with 1.2: the 1.25s of rows 0 and 2 and row 2's 1.5 (row 0's 2.0 is padding, row 1 has A < 0).
    # high with 1.28: row 2's 1.5 only.
    logprobs, old, adv, mask, _ = policy_inputs()
    out = policy_loss(logprobs, old, adv, mask, loss_type="grpo", epsilon_high=epsilon_high)
    assert out.clip_low == pytest.approx(1 / TOKENS)
    assert out.clip_high == pytest.approx(high_tokens / TOKENS)
    # the same counts with loops
    high = 0.2 if epsilon_high is None else epsilon_high
    low_count = sum(1 for r, m, a, *_ in rows() for x, k in zip(r, m) if k and x < 0.8 and a < 0)
    high_count = sum(1 for r, m, a, *_ in rows() for x, k in zip(r, m) if k and x > 1 + high and a > 0)
    assert (low_count, high_count) == (1, high_tokens)
    metrics = out.metrics()
    assert metrics["clip_ratio/low_mean"] == out.clip_low and metrics["clip_ratio/high_mean"] == out.clip_high
    assert metrics["clip_ratio/region_mean"] == pytest.approx((1 + high_tokens) / TOKENS)
    assert metrics["kl"] == 0.0  # no reference model


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_kl_metric_is_the_masked_mean_of_k3(beta):
    logprobs, old, adv, mask, ref = policy_inputs()
    values = [math.exp(rf - lp) - (rf - lp) - 1
              for _, m, _, lps, refs in rows() for lp, rf, k in zip(lps, refs, m) if k]
    out = policy_loss(logprobs, old, adv, mask, loss_type="bnpo", beta=beta, ref_logprobs=ref)
    assert out.kl == pytest.approx(sum(values) / len(values))
    assert out.metrics()["kl"] == out.kl


@pytest.mark.parametrize("loss_type", list(OPTIONS))
def test_at_ratio_one_the_gradient_is_reinforce(loss_type):
    """old == logprobs: d loss / d logprob = -A * (the loss_type's weight of that token)."""
    logprobs, _, adv, mask, _ = policy_inputs()
    logprobs = logprobs.clone().requires_grad_(True)
    options = dict(OPTIONS[loss_type], grad_accum=2) if loss_type == "dapo" else OPTIONS[loss_type]
    out = policy_loss(logprobs, logprobs.detach(), adv, mask, loss_type=loss_type, **options)
    out.loss.backward()
    N = len(MASK)
    for i, (row_mask, a) in enumerate(zip(MASK, ADVANTAGES)):
        for t, m in enumerate(row_mask):
            if loss_type == "grpo":
                weight = 1 / (sum(row_mask) * N)
            elif loss_type == "bnpo":
                weight = 1 / TOKENS
            elif loss_type == "dr_grpo":
                weight = 1 / (N * 6)
            else:
                weight = 2 / 12.0
            close(float(logprobs.grad[i, t]), -a * weight * m)
    assert out.clip_low == 0.0 and out.clip_high == 0.0


def test_dapo_micro_batches_add_up_to_the_whole_batch():
    """Split 2 + 1 rows: each micro-batch's loss with the step's token count and grad_accum=2, averaged as the
    loop does, equals the loss of the whole batch (bnpo, which normalises per micro-batch, does not)."""
    whole_inputs = policy_inputs()
    first, second = policy_inputs(slice(0, 2)), policy_inputs(slice(2, 3))
    total = float(whole_inputs[3].sum())

    def loss(inputs, **options):
        lp, old, adv, mask, ref = inputs
        return policy_loss(lp, old, adv, mask, beta=0.04, ref_logprobs=ref, **options).loss

    whole = loss(whole_inputs, loss_type="dapo", step_tokens=total)
    parts = [loss(p, loss_type="dapo", step_tokens=total, grad_accum=2) for p in (first, second)]
    close(float((parts[0] + parts[1]) / 2), float(whole))
    close(float(whole), ref_policy_loss(rows(), "dapo", beta=0.04, step_tokens=total))
    close(float(whole), ref_policy_loss(rows(), "bnpo", beta=0.04))  # one micro-batch: dapo is bnpo
    bnpo = [loss(p, loss_type="bnpo") for p in (first, second)]
    assert abs(float((bnpo[0] + bnpo[1]) / 2) - float(loss(whole_inputs, loss_type="bnpo"))) > 1e-3


def test_policy_loss_errors():
    logprobs, old, adv, mask, ref = policy_inputs()
    with pytest.raises(ConfigError, match="max_completion_length"):
        policy_loss(logprobs, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ConfigError, match="dapo needs the completion tokens"):
        policy_loss(logprobs, old, adv, mask, loss_type="dapo")
    with pytest.raises(ConfigError, match="beta > 0 needs the reference"):
        policy_loss(logprobs, old, adv, mask, loss_type="grpo", beta=0.1)
    with pytest.raises(ConfigError, match="unknown loss_type 'ppo'"):
        policy_loss(logprobs, old, adv, mask, loss_type="ppo")


def test_bool_mask_and_an_empty_row():
    logprobs, old, adv, mask, _ = policy_inputs()
    mask[1] = 0  # a completion with no trainable token counts as 0 in grpo's mean over sequences
    rows_ = [(r, m if i != 1 else [0] * 4, a, lp, rf) for i, (r, m, a, lp, rf) in enumerate(rows())]
    out = policy_loss(logprobs, old, adv, mask.bool(), loss_type="grpo")
    close(float(out.loss), ref_policy_loss(rows_, "grpo"))
    assert math.isfinite(float(out.loss))


# ------------------------------------------------------------------------------------------
# Preferences
# ------------------------------------------------------------------------------------------
CHOSEN, REJECTED = [-4.0, -10.0, -6.0, -3.0], [-7.0, -9.0, -6.5, -8.0]
REF_CHOSEN, REF_REJECTED = [-5.0, -9.5, -6.0, -6.0], [-6.0, -9.5, -6.0, -4.0]
H = [(c - rc) - (r - rr) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]  # [2, -1.5, 0.5, 7]


def preference_tensors():
    return tuple(torch.tensor(v) for v in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED))


def ref_dpo(loss_type: str, beta: float, ls: float = 0.0) -> float:
    losses = []
    for h in H:
        if loss_type == "sigmoid":
            losses.append(-(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h))
        elif loss_type == "robust":
            losses.append((-(1 - ls) * log_sigmoid(beta * h) + ls * log_sigmoid(-beta * h)) / (1 - 2 * ls))
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - beta * h))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0),
                                                        ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_the_formulas(loss_type, label_smoothing, beta):
    got = dpo_loss(*preference_tensors(), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    close(float(got), ref_dpo(loss_type, beta, label_smoothing))


def test_dpo_loss_by_hand():
    one = [torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0)]  # h = 2
    close(float(dpo_loss(*one, beta=0.5)), math.log(1 + math.exp(-1.0)))
    close(float(dpo_loss(*one, beta=0.5, loss_type="ipo")), (2 - 1) ** 2)
    close(float(dpo_loss(*one, beta=0.25, loss_type="hinge")), 0.5)
    close(float(dpo_loss(*one, beta=0.5, loss_type="hinge")), 0.0)
    # robust DPO is cDPO rescaled and with the flipped term's sign turned: different once ls > 0
    smoothed = float(dpo_loss(*one, beta=0.5, loss_type="sigmoid", label_smoothing=0.2))
    robust = float(dpo_loss(*one, beta=0.5, loss_type="robust", label_smoothing=0.2))
    close(robust, (-0.8 * log_sigmoid(1.0) + 0.2 * log_sigmoid(-1.0)) / 0.6)
    assert abs(smoothed - robust) > 0.1


def test_dpo_loss_gradients():
    """sigmoid and robust always raise the chosen reply and lower the rejected one; IPO pulls h to 1 / (2 beta),
    so it pushes back on the pair whose h = 7 is above 5: d/d chosen = 2 (h - 5) / N."""
    beta = 0.1
    for loss_type, ls in (("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("ipo", 0.0)):
        chosen, rejected, ref_c, ref_r = (t.clone().requires_grad_(i < 2) for i, t in enumerate(preference_tensors()))
        dpo_loss(chosen, rejected, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=ls).backward()
        if loss_type == "ipo":
            close(chosen.grad, [2 * (h - 1 / (2 * beta)) / 4 for h in H])
        else:
            assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
        close(rejected.grad, (-chosen.grad).tolist())


def test_dpo_loss_errors():
    tensors = preference_tensors()
    with pytest.raises(ConfigError, match="label_smoothing < 0.5"):
        dpo_loss(*tensors, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="unknown DPO loss_type 'kto'"):
        dpo_loss(*tensors, loss_type="kto")


def test_dpo_metrics():
    beta = 0.2
    chosen = [beta * (c - rc) for c, rc in zip(CHOSEN, REF_CHOSEN)]
    rejected = [beta * (r - rr) for r, rr in zip(REJECTED, REF_REJECTED)]
    metrics = dpo_metrics(*preference_tensors(), beta=beta)
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / 4)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected) / 4)
    assert metrics["rewards/margins"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 4)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 4)
    assert metrics["rewards/accuracies"] == 0.75  # h = [2, -1.5, 0.5, 7]
    tie = dpo_metrics(*(torch.tensor([v, 0.0]) for v in (-1.0, -2.0, -1.0, -2.0)), beta=beta)
    assert tie["rewards/accuracies"] == 0.0 and tie["rewards/margins"] == 0.0  # a tie is not a win, as in TRL


@pytest.mark.parametrize("margin", [None, [0.5, 0.0, 2.0]])
@pytest.mark.parametrize("center", [0.0, 0.01])
def test_bradley_terry_loss(margin, center):
    chosen, rejected = [1.5, -0.5, 3.0], [0.5, 0.5, -1.0]
    expected = 0.0
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        expected += -log_sigmoid(c - r - (margin[i] if margin else 0.0)) / 3
    expected += center * sum((c + r) ** 2 for c, r in zip(chosen, rejected)) / 3
    got = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected),
                             margin=None if margin is None else torch.tensor(margin), center_coefficient=center)
    close(float(got), expected)


def test_bradley_terry_by_hand():
    close(float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))), math.log(2))
    close(float(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]))), math.log(2))
    close(float(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coefficient=0.5)),
          math.log(2) + 0.5 * 4.0)


# ------------------------------------------------------------------------------------------
# adapters_disabled: the reference policy without a second copy of the weights
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_and_base():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    base = copy.deepcopy(model).requires_grad_(False)  # the explicit frozen reference
    apply_lora(model, LoraConfig(r=4, alpha=8.0, targets=["all"]))
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(adapters, lr=0.5)
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
    assert all(float(m.lora_B[k].detach().abs().max()) > 0 for m in model.modules() if isinstance(m, LoRALinear)
               for k in m.lora_B)
    return model, base, torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(2))


def forward(model, ids):
    with torch.no_grad():
        return model(ids)


def test_adapters_disabled_is_exactly_the_base_model(lora_and_base):
    model, base, ids = lora_and_base
    expected = forward(base, ids)
    assert (forward(model, ids) - expected).abs().max() > 1e-3  # the trained adapters change the model
    with adapters_disabled(model):
        assert torch.equal(forward(model, ids), expected)
        with adapters_disabled(model):  # nested: still the base after the inner block
            pass
        assert torch.equal(forward(model, ids), expected)
    assert (forward(model, ids) - expected).abs().max() > 1e-3  # re-enabled


def test_adapters_come_back_after_an_exception(lora_and_base):
    model, base, ids = lora_and_base
    adapted = forward(model, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with adapters_disabled(model):
            assert torch.equal(forward(model, ids), forward(base, ids))
            raise RuntimeError("inside")
    assert torch.equal(forward(model, ids), adapted)
    assert all(m.enabled for m in model.modules() if isinstance(m, LoRALinear))


def test_adapters_disabled_keeps_gradients_to_the_adapters_outside(lora_and_base):
    """The reference pass inside the block gives no gradient to the adapters; the policy pass outside does."""
    model, _, ids = lora_and_base
    with adapters_disabled(model):
        reference = model(ids)
    assert not reference.requires_grad  # only adapters are trainable, and they are off
    policy = model(ids)
    policy.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    model.zero_grad(set_to_none=True)

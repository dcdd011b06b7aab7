"""The losses of reward- and preference-driven fine-tuning, on plain tensors.

Policy optimisation (GRPO, RLOO, REINFORCE; names and normalisations as in Hugging Face TRL):

* advantages per completion: :func:`group_advantages` (GRPO: reward minus its group's mean, divided by
  the group's std unless ``scale=False``), :func:`leave_one_out_advantages` (RLOO: reward minus the
  mean of the *other* completions of its prompt), :func:`mean_baseline_advantages` (REINFORCE: reward
  minus the batch mean);
* :func:`policy_loss`: PPO's clipped surrogate per token, ``-min(ratio * A, clip(ratio, 1 - eps_low,
  1 + eps_high) * A)``, plus ``beta`` times the k3 estimate of KL(policy || reference)
  (:func:`kl_k3`), reduced by ``loss_type``:

  ``grpo``     each sequence's mean over its tokens, then the mean over sequences;
  ``bnpo``     the mean over every completion token of the micro-batch;
  ``dr_grpo``  the sum over tokens divided by ``batch size * max_completion_length`` (Dr. GRPO);
  ``dapo``     the sum over tokens divided by the completion tokens of the whole optimiser step
               (every micro-batch of it), so that each token weighs the same.

Preferences: :func:`dpo_loss` (sigmoid with label smoothing, ``ipo``, ``robust``, ``hinge``) and
:func:`bradley_terry_loss` for reward models.

Shapes: completions are rows ``(N,)``, tokens ``(N, T)`` with a float or bool ``mask`` (N, T) that
is 1 on the tokens the policy wrote and trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


# ------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------
def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """(N,) -> (N / G, G), checking that the groups divide the batch."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ConfigError(f"a group of {group_size} completions does not divide {rewards.numel()} rewards")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO: ``(r - group mean) / (group std + eps)`` (std with Bessel's correction, as TRL), or
    only ``r - group mean`` with ``scale=False``. rewards (N,), grouped consecutively -> (N,)."""
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + eps)
    return centred.flatten()


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: ``r_i - mean_{j != i} r_j`` within each group of ``group_size`` (>= 2). (N,) -> (N,)."""
    if group_size < 2:
        raise ConfigError("the leave-one-out baseline needs num_generations >= 2")
    groups = _groups(rewards, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def mean_baseline_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE with a mean baseline: ``r - mean(r)`` over the whole batch. (N,) -> (N,)."""
    rewards = rewards.float()
    return rewards - rewards.mean()


def advantages_for(algorithm: str, rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """The advantages of ``algorithm``: grpo, rloo or reinforce."""
    if algorithm == "grpo":
        return group_advantages(rewards, group_size, scale)
    if algorithm == "rloo":
        return leave_one_out_advantages(rewards, group_size)
    if algorithm == "reinforce":
        return mean_baseline_advantages(rewards)
    raise ConfigError(f"unknown algorithm {algorithm!r}: choose grpo, rloo or reinforce")


def frac_zero_std(rewards: Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (they teach GRPO nothing)."""
    groups = _groups(rewards, group_size)
    return float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean())


# ------------------------------------------------------------------------------------------
# Token log-probabilities
# ------------------------------------------------------------------------------------------
def sequence_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Log-probability of each next token: logits (N, T, V) at positions 0..T-2 score the ids at
    1..T-1. Returns (N, T-1), computed in float32."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def entropy(logits: Tensor) -> Tensor:
    """Entropy of each position's next-token distribution: (N, T, V) -> (N, T), in nats."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is set (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token, from samples of the policy:
    ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, never negative)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


# ------------------------------------------------------------------------------------------
# The clipped policy objective
# ------------------------------------------------------------------------------------------
@dataclass
class PolicyLoss:
    """The loss and what a practitioner reads about it (floats; TRL's metric names in :meth:`metrics`)."""

    loss: Tensor
    kl: float
    clip_low: float      # share of tokens whose ratio was clipped below (advantage < 0)
    clip_high: float     # share clipped above (advantage > 0)

    def metrics(self) -> dict[str, float]:
        return {"kl": self.kl, "clip_ratio/low_mean": self.clip_low, "clip_ratio/high_mean": self.clip_high,
                "clip_ratio/region_mean": self.clip_low + self.clip_high}


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
                beta: float = 0.0, ref_logprobs: Tensor | None = None, max_completion_length: int | None = None,
                step_tokens: float | None = None, grad_accum: int = 1) -> PolicyLoss:
    """PPO-clip surrogate (+ ``beta`` * k3 KL) per token, reduced by ``loss_type`` (module docstring).

    logprobs, old_logprobs, ref_logprobs, mask: (N, T); advantages: (N,). ``dr_grpo`` needs
    ``max_completion_length``; ``dapo`` needs ``step_tokens``, the completion tokens of the whole
    optimiser step, and ``grad_accum`` (the loop divides each micro-batch's loss by it).
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    mask = mask.to(logprobs.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logprobs - old_logprobs)
    A = advantages.to(logprobs.dtype).unsqueeze(1)  # (N, 1)
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + high) * A)
    kl = torch.zeros((), device=logprobs.device)
    if beta:
        if ref_logprobs is None:
            raise ConfigError("beta > 0 needs the reference model's log-probabilities")
        token_kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * token_kl
        kl = masked_mean(token_kl.detach(), mask)
    elif ref_logprobs is not None:
        kl = masked_mean(kl_k3(logprobs.detach(), ref_logprobs), mask)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ConfigError("loss_type dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    else:
        if not step_tokens:
            raise ConfigError("loss_type dapo needs the completion tokens of the optimiser step")
        loss = (per_token * mask).sum() * grad_accum / step_tokens
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (A < 0)).to(mask.dtype)
        high_clipped = ((ratio > 1 + high) & (A > 0)).to(mask.dtype)
        clip_low, clip_high = float(masked_mean(low, mask)), float(masked_mean(high_clipped, mask))
    return PolicyLoss(loss, float(kl), clip_low, clip_high)


# ------------------------------------------------------------------------------------------
# Preferences
# ------------------------------------------------------------------------------------------
def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> Tensor:
    """Direct Preference Optimisation (Rafailov et al. 2023) on summed response log-probabilities (N,).

    With ``h = (chosen - ref_chosen) - (rejected - ref_rejected)``:
    ``sigmoid``: ``-(1 - ls) log σ(βh) - ls log σ(-βh)`` (``ls`` = ``label_smoothing``, cDPO);
    ``robust``: the unbiased loss under label noise ``ls`` (Chowdhury et al. 2024),
    ``(-(1 - ls) log σ(βh) + ls log σ(-βh)) / (1 - 2 ls)``;
    ``ipo``: ``(h - 1 / (2β))²`` (Azar et al. 2023; TRL averages the log-probabilities per token for it);
    ``hinge``: ``max(0, 1 - βh)``. Returns the mean over pairs.
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"robust DPO needs 0 <= label_smoothing < 0.5, not {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ConfigError(f"unknown DPO loss_type {loss_type!r}: choose one of {', '.join(DPO_LOSS_TYPES)}")
    return losses.mean()


def dpo_metrics(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, beta: float) -> dict[str, float]:
    """TRL's DPO numbers: the implicit rewards ``β (logp - ref_logp)`` of the chosen and rejected
    replies, their margin, and the share of pairs where the chosen reward is higher."""
    chosen = beta * (chosen_logps - ref_chosen_logps).detach().float()
    rejected = beta * (rejected_logps - ref_rejected_logps).detach().float()
    return {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "rewards/accuracies": float((chosen > rejected).float().mean())}


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None,
                       center_coefficient: float = 0.0) -> Tensor:
    """Reward-model loss: ``-log σ(s_chosen - s_rejected - margin)``, mean over pairs (N,); with
    ``center_coefficient``, plus that times ``mean((s_chosen + s_rejected)²)`` to keep scores
    centred on zero (TRL's ``center_rewards_coefficient``)."""
    difference = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        difference = difference - margin.float()
    loss = -F.logsigmoid(difference).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen_scores.float() + rejected_scores.float()) ** 2).mean()
    return loss

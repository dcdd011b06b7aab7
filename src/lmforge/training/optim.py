"""Optimisers with decay / no-decay parameter groups, and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2-D weights (matrices, embeddings) decay; norms and biases do not (nanoGPT's rule).

    Only parameters that require gradients are included (frozen ones, e.g. under LoRA, are left out).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernel where available), SGD with momentum, or Adagrad."""
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                                 fused=device.type in ("cpu", "cuda"))
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adagrad(groups, lr=config.lr)


def learning_rate(step: int, config: TrainConfig, elapsed: float | None = None) -> float:
    """Rate for optimiser step ``step`` (0-based): linear warm-up, then a cosine or linear decay to
    ``min_lr``, or constant.

    The decay runs over ``decay_steps`` (default ``max_steps``); a run with only a time budget decays
    over ``max_time`` seconds instead, using ``elapsed``. Past the end of the decay the rate is ``min_lr``.
    """
    peak = config.lr
    floor = config.min_lr if config.min_lr is not None else peak / 10
    if step < config.warmup_steps:
        return peak * (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return peak
    decay_steps = config.decay_steps or config.max_steps
    if decay_steps is not None:
        ratio = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    elif config.max_time is not None and elapsed is not None:
        ratio = elapsed / config.max_time
    else:
        return peak
    ratio = min(max(ratio, 0.0), 1.0)
    if config.schedule == "linear":
        return peak - ratio * (peak - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)

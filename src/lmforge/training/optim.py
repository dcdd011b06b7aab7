"""Optimisers with decay / no-decay parameter groups (optionally with layer-wise learning-rate decay),
and learning-rate schedules."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.errors import ConfigError

BLOCK_NAME = re.compile(r"(?:^|\.)((?:\w+_)?blocks\.\d+)\.")  # blocks.3., encoder_blocks.0., ...


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Depth of every parameter, for layer-wise learning-rate decay: 0 for what comes before the first
    block (embeddings), k for the k-th numbered block in registration order (``blocks.N``,
    ``encoder_blocks.N``, ``decoder_blocks.N``; 1-based), the last block's depth for parameters between
    blocks (e.g. an encoder's final norm) and L + 1 for what follows the last of the L blocks (final
    norm, LM or task heads)."""
    names = [name for name, _ in model.named_parameters()]
    blocks: dict[str, int] = {}
    for name in names:
        match = BLOCK_NAME.search(name)
        if match and match.group(1) not in blocks:
            blocks[match.group(1)] = len(blocks) + 1
    if not blocks:
        raise ConfigError(f"train.layer_lr_decay needs a model of numbered blocks (transformers); "
                          f"{type(model).__name__} has none")
    last_block = max(i for i, name in enumerate(names) if BLOCK_NAME.search(name))
    depths, depth = {}, 0
    for i, name in enumerate(names):
        match = BLOCK_NAME.search(name)
        if match:
            depth = blocks[match.group(1)]
        depths[name] = len(blocks) + 1 if i > last_block else depth
    return depths


def parameter_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """2-D weights (matrices, embeddings) decay; norms and biases do not (nanoGPT's rule).

    With ``layer_lr_decay`` d < 1 (ELECTRA's and BEiT's layer-wise decay, for fine-tuning) each group
    also carries ``lr_scale`` = d ** (D - depth) (:func:`layer_depths`, D the greatest depth): the
    heads keep the full rate, the top block d times it and the embeddings d ** (L + 1). A parameter may
    carry its own ``lr_scale`` attribute too (e.g. a classifier's n-gram table, which learns from zero
    at a far larger rate than a pretrained backbone); it multiplies the layer's. Only parameters that
    require gradients are included (frozen ones, e.g. under LoRA, are left out).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    depths = layer_depths(model) if layer_lr_decay != 1.0 else None
    top = max(depths.values()) if depths else 0
    groups: dict[tuple[bool, float], dict] = {}
    if depths is None:  # the plain pair first, as always (optimiser states saved before any lr_scale resume)
        groups = {(True, 1.0): {"params": [], "weight_decay": weight_decay},
                  (False, 1.0): {"params": [], "weight_decay": 0.0}}
    for name, p in named:
        decays = p.dim() >= 2
        scale = getattr(p, "lr_scale", 1.0) * (layer_lr_decay ** (top - depths[name]) if depths else 1.0)
        group = groups.setdefault((decays, scale), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    **({"lr_scale": scale} if scale != 1.0 else {})})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernel where available), SGD with momentum, or Adagrad."""
    groups = parameter_groups(model, config.weight_decay, config.layer_lr_decay)
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

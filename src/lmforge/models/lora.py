"""Low-rank adapters (LoRA, Hu et al. 2021), injected into any model that declares its linear layers.

A frozen linear layer ``W`` (out, in) gets a trainable low-rank update per target::

    y = W x + b + (alpha / r) * B A dropout(x)        A: (r, in)   B: (rows, r)

``A`` starts like a linear layer's weight (Kaiming-uniform, as in PEFT) and ``B`` at zero, so a freshly
adapted model computes exactly what the base model does. Fused projections carry one adapter per
target, each writing only its own output rows: on ``qkv_proj`` the ``q`` adapter changes queries
alone, as PEFT's adapter on a separate ``q_proj`` would.

A model family opts in by one method, ``linear_targets()`` (target name -> [(module path, rows)],
see :meth:`lmforge.models.decoder.DecoderLM.linear_targets`); nothing here knows a family's layout::

    model = apply_lora(DecoderLM(config), LoraConfig(r=8, targets=["attn"]))  # adapters train, rest frozen
    ...train...
    model = merge_lora(model)  # plain nn.Linear layers again: saves and loads as a normal checkpoint

Adapters appear in the state dict next to the wrapped layer: ``blocks.0.attn.qkv_proj.base.weight``
(frozen) and ``blocks.0.attn.qkv_proj.lora_A.q`` / ``...lora_B.q``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import LORA_GROUPS, LoraConfig
from lmforge.errors import CheckpointError, ConfigError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one low-rank adapter per output-row segment.

    Args:
        base: the layer to adapt, (in_features) -> (out_features); kept as ``self.base``.
        segments: target name -> the output rows its adapter writes (a ``slice``, or None for all).
        r, alpha, dropout: rank, scaling numerator (updates are scaled by alpha / r), and dropout
            probability on the adapters' input (training only; one mask shared by all segments).

    Parameters (on the base weight's device, in its dtype), for each target name ``t``:
        ``lora_A[t]`` (r, in_features), ``lora_B[t]`` (rows of t, r).
    """

    def __init__(self, base: nn.Linear, segments: dict[str, slice | None], r: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ConfigError(f"LoRA rank must be > 0, not {r}")
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.rows: dict[str, tuple[int, int]] = {}
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, rows in segments.items():
            start, stop, step = (rows or slice(None)).indices(base.out_features)
            if step != 1 or stop <= start:
                raise ValueError(f"LoRA segment {name!r} needs a non-empty contiguous row slice, not {rows}")
            self.rows[name] = (start, stop)
            self.lora_A[name] = nn.Parameter(torch.empty(r, base.in_features, **factory))
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, r, **factory))
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))  # as nn.Linear (and PEFT)
        self.enabled = True  # False: the layer computes base(x) alone (see adapters_disabled)
        self.train(base.training)

    # The wrapped layer's attributes, so code that reads e.g. ``lm_head.weight`` keeps working.
    # ``weight`` is the frozen base weight, without the adapters' update (see :meth:`delta_weight`).
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features): base(x), plus each adapter in its rows."""
        out = self.base(x)  # (..., out)
        if not self.enabled:
            return out
        h = self.dropout(x)  # (..., in)
        for name, (start, stop) in self.rows.items():
            delta = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scaling  # (..., rows)
            if stop - start == out.shape[-1]:
                out = out + delta.to(out.dtype)
            else:  # the base output is not needed for its own backward, so it may be updated in place
                out[..., start:stop] += delta.to(out.dtype)
        return out

    def delta_weight(self) -> Tensor:
        """The adapters' update of the base weight, (out_features, in_features), in float32 or wider."""
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        delta = torch.zeros(self.base.weight.shape, device=self.base.weight.device, dtype=dtype)
        for name, (start, stop) in self.rows.items():
            delta[start:stop] = self.scaling * (self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype))
        return delta

    def extra_repr(self) -> str:
        targets = ", ".join(f"{name}[{start}:{stop}]" for name, (start, stop) in self.rows.items())
        return f"r={self.r}, alpha={self.alpha:g}, targets: {targets}"


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` has LoRA adapters (and so is not a plain model)."""
    return any(isinstance(module, LoRALinear) for module in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base inside the block: every adapter is switched off (the
    reference policy of RL and DPO costs no second copy of the weights)."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    states = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap ``model``'s targeted linear layers in :class:`LoRALinear`, in place, and freeze the rest.

    The targets come from ``config.target_names()`` and are looked up in ``model.linear_targets()``.
    Several targets on one fused layer share one LoRALinear. An explicitly named target the model
    lacks is an error; a group (``mlp``, ``all``) takes the targets that exist. Afterwards only the
    adapters require grad. A tied head stays tied: its adapter changes the head's output only.

    Returns ``model``. Raises :class:`ConfigError` for a bad config, a missing target, a model
    without ``linear_targets``, or a model that already has adapters.
    """
    config.validate()
    if not config.enabled:
        raise ConfigError("lora.r must be > 0 to add adapters (0 means full fine-tuning)")
    if has_lora(model):
        raise ConfigError("the model already has LoRA adapters; merge_lora it first to add new ones")
    if not hasattr(model, "linear_targets"):
        raise ConfigError(f"{type(model).__name__} does not declare linear_targets(), so it cannot get LoRA")
    offered = model.linear_targets()
    explicit = [t for t in config.targets if t not in LORA_GROUPS]
    absent = [t for t in explicit if t not in offered]
    if absent:
        raise ConfigError(f"this model has no {', '.join(absent)} layer for LoRA; it offers "
                          f"{', '.join(offered)} (or the groups {', '.join(LORA_GROUPS)})")
    chosen = [t for t in config.target_names() if t in offered]
    if not chosen:
        raise ConfigError(f"lora.targets {config.targets} match no layer; this model offers {', '.join(offered)}")

    per_module: dict[str, dict[str, slice | None]] = {}
    for target in chosen:
        for path, rows in offered[target]:
            per_module.setdefault(path, {})[target] = rows
    model.requires_grad_(False)
    for path, segments in per_module.items():
        base = model.get_submodule(path)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRA target {path} is a {type(base).__name__}, not an nn.Linear")
        _set_submodule(model, path, LoRALinear(base, segments, config.r, config.alpha, config.dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (W += alpha/r * B A in its rows), in place.

    Each :class:`LoRALinear` becomes its plain ``nn.Linear`` again, so the state dict has the names of
    an unadapted model. A weight shared with another layer (a head tied to the token embedding) is
    never changed in place: when its update is non-zero the layer gets its own weight, and a config
    with ``tie_embeddings`` says False from then on (a new config object; the old one is untouched).
    Parameters keep their ``requires_grad`` (frozen by :func:`apply_lora`). Returns ``model``.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    untied = False
    for path, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        linear, weight = module.base, module.base.weight
        delta = module.delta_weight()
        with torch.no_grad():
            if not delta.any():
                pass  # nothing learned: the layer is unchanged (and stays tied if it was)
            elif uses[id(weight)] > 1:
                merged = (weight.to(delta.dtype) + delta).to(weight.dtype)
                linear.weight = nn.Parameter(merged, requires_grad=weight.requires_grad)
                untied = True
            else:
                weight.copy_(weight.to(delta.dtype) + delta)
        _set_submodule(model, path, linear)
    config = getattr(model, "config", None)
    if untied and dataclasses.is_dataclass(config) and getattr(config, "tie_embeddings", False):
        model.config = dataclasses.replace(config, tie_embeddings=False)
    return model


def _adapters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter under its state-dict name (``<layer>.lora_A.<target>``)."""
    found: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = f"{path}." if path else ""
            for kind in ("lora_A", "lora_B"):
                found.update(getattr(module, kind).named_parameters(prefix=f"{prefix}{kind}"))
    return found


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only (detached, sharing storage), named as in ``model.state_dict()``.

    The rank is in the shapes; alpha (the scaling) is not stored: it comes from the LoraConfig.
    """
    return {name: p.detach() for name, p in _adapters(model).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors into ``model``'s adapters, strictly (names and shapes must all match).

    Raises :class:`CheckpointError` for a model without adapters or for missing, unexpected or
    wrongly shaped tensors (e.g. another rank or other targets).
    """
    own = _adapters(model)
    if not own:
        raise CheckpointError("the model has no LoRA adapters to load into; apply_lora it first")
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"LoRA weights do not fit the model's adapters: missing {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{' ...' if len(unexpected) > 3 else ''} (other lora.targets?)")
    for name, parameter in own.items():
        if state[name].shape != parameter.shape:
            raise CheckpointError(f"LoRA weight {name} has shape {tuple(state[name].shape)} but the model expects "
                                  f"{tuple(parameter.shape)} (another lora.r?)")
    with torch.no_grad():
        for name, parameter in own.items():
            parameter.copy_(state[name])


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a shared tensor (a tied head) counts once."""
    params = list(model.parameters())  # parameters() yields each shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)

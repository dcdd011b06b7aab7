"""Model families. Each family is one readable file; this registry maps a family name to it.

Later families (encoder, seq2seq, lstm) register here too, so checkpoints, the training loop and the
API find every model the same way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.models.decoder import DecoderLM

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "decoder": (ModelConfig, DecoderLM),
}


def build_model(config: Any) -> nn.Module:
    """A freshly initialised model for ``config`` (its ``family`` picks the class)."""
    _, model_class = FAMILIES[config.family]
    return model_class(config)


def config_from_dict(values: dict[str, Any]) -> Any:
    """The config dataclass of a saved model (``family`` picks the class)."""
    family = values.get("family", "decoder")
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; this lmforge knows {', '.join(FAMILIES)}")
    config_class, _ = FAMILIES[family]
    values = dict(values)
    preset = values.pop("preset", None)  # recorded for information; the fields are all explicit
    config = config_class.from_dict(values)
    config.preset = preset
    return config

"""Model families. Each family is one readable file; this registry maps a family name to it.

Every family's architecture is a :class:`~lmforge.config.ModelConfig` (its ``family`` field picks
the class), so checkpoints, the training loop and the API find every model the same way. Classes are
imported on first use, so loading a decoder never imports the other families.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Any

from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError

FAMILIES: dict[str, str] = {  # family -> "module:class"
    "decoder": "lmforge.models.decoder:DecoderLM",
    "encoder": "lmforge.models.encoder:EncoderLM",
    "seq2seq": "lmforge.models.seq2seq:Seq2SeqLM",
    "lstm": "lmforge.models.lstm:LSTMLM",
}


def model_class(family: str) -> type[nn.Module]:
    """The class of a model family."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; this lmforge knows {', '.join(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(import_module(module), name)


def build_model(config: Any) -> nn.Module:
    """A freshly initialised model for ``config`` (its ``family`` picks the class)."""
    return model_class(config.family)(config)


def config_from_dict(values: dict[str, Any]) -> Any:
    """The config dataclass of a saved model (``family`` picks the class)."""
    family = values.get("family", "decoder")
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; this lmforge knows {', '.join(FAMILIES)}")
    values = dict(values)
    preset = values.pop("preset", None)  # recorded for information; the fields are all explicit
    config = ModelConfig.from_dict(values)
    config.preset = preset
    return config


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

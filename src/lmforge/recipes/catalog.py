"""Shipped recipes: the winning benchmark settings as YAML files in ``lmforge/recipes/yaml/``.

A recipe is what ``--config FILE`` of ``lmforge pretrain`` or ``lmforge finetune`` reads, plus a small
metadata header that says which command it is for, what it does and where its numbers come from::

    recipe:
      command: finetune
      needs: [tokenizer, data.path, data.target_path, out]
      description: ...
      measured: "35.93 BLEU on Multi30k val in 60 min (docs/benchmarks.md)"
    model: {preset: seq2seq-small, position: rope}
    train: {lr: 0.001, ...}

The user still passes what ``needs`` lists (the data, the run directory, a base checkpoint or a tokenizer)
on the command line; every other flag overrides the recipe's value. A recipe never names a data path.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import read_config_file
from lmforge.errors import ConfigError

COMMANDS = ("pretrain", "finetune")
METADATA_KEY = "recipe"


def _folder() -> Any:
    return resources.files("lmforge") / "recipes" / "yaml"


def _load(name: str) -> dict[str, Any]:
    """The whole recipe file (metadata included) of a shipped recipe, by name."""
    resource = _folder() / f"{name}.yaml"
    if not resource.is_file():
        known = recipe_names()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} (recipes: {', '.join(known)})")
    try:
        data = yaml.safe_load(resource.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:  # a broken shipped file: say which
        raise ConfigError(f"recipe {name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get(METADATA_KEY), dict):
        raise ConfigError(f"recipe {name} has no '{METADATA_KEY}:' header with its command")
    return data


def recipe_path(name: str) -> Path:
    """The YAML file of a shipped recipe (it can be copied and edited, then given to ``--config``)."""
    _load(name)  # unknown names raise with a hint
    return Path(str(_folder() / f"{name}.yaml"))


def recipe_info(name: str) -> dict[str, Any]:
    """The metadata header of a shipped recipe: ``command``, ``needs`` (the dotted options the command line
    must add), ``description``, ``measured`` and, where it matters, ``tokenizer`` (the kind it was measured
    with)."""
    info = dict(_load(name)[METADATA_KEY])
    info.setdefault("needs", [])
    info.setdefault("description", "")
    info.setdefault("measured", "")
    return info


def recipe_names(command: str | None = None) -> list[str]:
    """Names of the shipped recipes, all or only those for ``pretrain`` or ``finetune``."""
    if command is not None and command not in COMMANDS:
        raise ConfigError(f"recipes are for {' or '.join(COMMANDS)}, not {command!r}")
    names = sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))
    if command is None:
        return names
    return [name for name in names if recipe_info(name).get("command") == command]


def recipe_values(name: str, command: str) -> dict[str, Any]:
    """The config mapping of recipe ``name`` for ``command`` ("pretrain" or "finetune"): exactly what
    ``lmforge COMMAND --config FILE`` reads from the recipe's file, without the metadata header."""
    if command not in COMMANDS:
        raise ConfigError(f"recipes are for {' or '.join(COMMANDS)}, not {command!r}")
    info = recipe_info(name)
    if info.get("command") != command:
        raise ConfigError(f"{name} is a {info.get('command')} recipe; use lmforge {info.get('command')} "
                          f"--recipe {name} (the {command} recipes: {', '.join(recipe_names(command)) or 'none'})")
    values = read_config_file(recipe_path(name))
    values.pop(METADATA_KEY, None)
    return values

"""What every ``lmforge`` command's parser shares: one-line usage errors, help with defaults, and
the run commands' options built from ``--recipe`` / ``--config FILE`` / flags."""

from __future__ import annotations

import argparse
from typing import Any


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" not in text and action.option_strings and action.default not in (None, False,
                                                                                         argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


Subcommands = Any  # what ArgumentParser.add_subparsers returns


def command(commands: Subcommands, name: str, help: str, description: str = "") -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=description or help, formatter_class=Formatter)


def add_checkpoint(parser: argparse.ArgumentParser, what: str = "checkpoint or run directory", hf: bool = False,
                   **kwargs: Any) -> None:
    parser.add_argument("checkpoint", help=what + (", or a Hugging Face folder" if hf else ""), **kwargs)


_SHORTHANDS = {"model": "preset", "data": "path"}  # 'model: NAME' is 'model: {preset: NAME}', and so on


def run_config(args: argparse.Namespace, cls: type, command: str, shorthands: tuple[str, ...]) -> tuple[Any, dict]:
    """The config of a training command, ``cls`` built from the ``--recipe NAME`` values updated by the
    ``--config FILE`` ones updated by the flags (nested mappings, deep-merged in that order); and that
    merged mapping, which says what was given. In each, a string stands for a whole ``shorthands``
    section: ``model: NAME`` is ``model: {preset: NAME}``, ``data: FILE`` is ``data: {path: FILE}``."""
    from lmforge.config import read_config_file
    from lmforge.options import build_dataclass, deep_merge, field_names, namespace_to_dict

    layers = []
    if getattr(args, "recipe", None):
        from lmforge.recipes.catalog import recipe_values

        layers.append(recipe_values(args.recipe, command))
    if args.config:  # (a copied recipe file's 'recipe:' header is its description, not an option)
        layers.append({k: v for k, v in read_config_file(args.config).items() if k != "recipe"})
    layers.append(namespace_to_dict(args, keep=field_names(cls)))
    values: dict[str, Any] = {}
    for layer in layers:
        for section in shorthands:
            if isinstance(layer.get(section), str):
                layer = {**layer, section: {_SHORTHANDS[section]: layer[section]}}
        values = deep_merge(values, layer)
    return build_dataclass(cls, values), values


def add_config_options(parser: argparse.ArgumentParser, command: str, sections: str, recipes: bool = True) -> None:
    """``--config FILE`` and (for commands with shipped recipes) ``--recipe NAME``, the bases of a
    training command's flags."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML file with {sections}")
    if not recipes:
        return
    parser.add_argument("--recipe", metavar="NAME",
                        help=f"a shipped {command} recipe (the settings of a measured run) to start from: "
                             "--config FILE and flags override it (an unknown NAME lists the recipes)")

"""One definition per option: dataclass fields become YAML keys and command-line flags.

A nested dataclass field ``train: TrainConfig`` becomes the YAML section ``train:`` and the flags
``--train.lr 3e-4``. Values from YAML and from the command line go through the same conversion and
validation, so a wrong key or value gets the same one-line :class:`ConfigError` from either.
Precedence: dataclass defaults < YAML file < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from lmforge.errors import ConfigError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def convert_value(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field type ``tp``, or raise ConfigError."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name} needs a value")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a whole number, not {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, not {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, not {value!r}")
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, not {value!r}")
    if typing.get_origin(inner) is list:
        (item_type,) = typing.get_args(inner)
        items = value if isinstance(value, list) else [value]
        return [convert_value(name, item, item_type) for item in items]
    raise ConfigError(f"{name}: unsupported option type {inner}")  # pragma: no cover - programming error


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown option '{full}'{hint}")


def build_dataclass(cls: type[T], values: dict[str, Any] | None, prefix: str = "") -> T:
    """Instantiate ``cls`` from a nested dict, converting and checking every key.

    A nested dataclass type with a ``from_dict`` classmethod (e.g. ``ModelConfig``, which resolves
    presets) builds itself.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(cls, key, prefix)
        tp = hints[key]
        name = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(tp):
            if hasattr(tp, "from_dict"):
                kwargs[key] = tp.from_dict(value)
            elif isinstance(value, dict) or value is None:
                kwargs[key] = build_dataclass(tp, value, name)
            else:
                raise ConfigError(f"{name} must be a mapping of options, not {value!r}")
        else:
            kwargs[key] = convert_value(name, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", flat: bool = False,
                  skip: tuple[str, ...] = (), defaults: bool = False) -> None:
    """Add one flag per field of ``cls`` (recursing into nested dataclasses).

    ``flat=True`` spells ``max_new_tokens`` as ``--max-new-tokens``; otherwise flags are dotted
    (``--train.lr``). Flags default to "not given" so that YAML values are not overwritten.

    ``defaults=True`` is for options read from the command line only (no YAML under them): each flag
    then defaults to its field's default and converts with the field's ``int``/``float`` type, and a
    ``bool`` field that defaults to False is a plain switch (``--log-prompts``). A field's ``metavar``
    metadata (``option(..., metavar="S")``) names its flag's value; ``None`` there means argparse's
    own (the flag's name in capitals).
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(prefix) if prefix and not flat else parser
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        dest = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            add_arguments(parser, tp, dest, flat=flat, defaults=defaults)
            continue
        flag = "--" + (f.name.replace("_", "-") if flat else dest)
        inner, _ = _unwrap_optional(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        switch = defaults and inner is bool and default is False
        help_text = f.metadata.get("help", "")
        if default not in (None, []) and "(default" not in help_text and not switch:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": dest, "default": default if defaults else argparse.SUPPRESS,
                                  "help": help_text}
        if switch:
            kwargs["action"] = "store_true"
        elif inner is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(inner) is list:
            kwargs.update(action="append", metavar=f.name.upper())
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(inner, f.name.upper())
            if defaults and inner in (int, float):
                kwargs["type"] = inner
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        group.add_argument(flag, **kwargs)


def field_names(cls: type) -> tuple[str, ...]:
    """The top-level option names of a config dataclass (what :func:`namespace_to_dict` keeps)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def namespace_to_dict(namespace: argparse.Namespace, keep: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Turn dotted argparse destinations (``train.lr``) into a nested dict."""
    nested: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if keep is not None and dest.split(".")[0] not in keep:
            continue
        node = nested
        *parents, leaf = dest.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` updated recursively by ``override``."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

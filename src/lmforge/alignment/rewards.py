"""Reward functions for RL fine-tuning, in TRL's shape.

A reward is a callable ``reward(prompts, completions, **columns) -> list[float | None]``: one value per
completion, where None means "not applicable" to that completion. Every other column of the prompt data
arrives as a keyword argument holding a list, one value per completion (``answer=[...]``), so a reward
must accept ``**kwargs`` it does not read. Completions come group by group: the G completions of the
first prompt, then those of the second, and so on.

:func:`load_reward` turns a spec such as ``exact_answer`` or ``format:<answer>.*</answer>`` into a
named :class:`Reward`; :class:`CombinedReward` calls several once per batch and sums them with weights
(skipping None, as TRL's nansum does); :func:`reward_metrics` gives TRL's metric names.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import numbers
import re
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import CheckpointError, ConfigError, DataError

# ------------------------------------------------------------------------------------------
# Answer extraction
# ------------------------------------------------------------------------------------------
NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
BOXED = re.compile(r"\\boxed\s*\{")


def normalize_number(s: str) -> str:
    """A number's canonical text: ``"1,234" -> "1234"``, ``"85.0" -> "85"``, ``"-0" -> "0"``,
    ``"007" -> "7"``, ``"3.50" -> "3.5"``. Anything but a number raises ValueError."""
    text = s.strip().replace("\u2212", "-").replace(",", "")
    if not PLAIN_NUMBER.fullmatch(text):
        raise ValueError(f"not a number: {s!r}")
    sign, text = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, fraction = text.partition(".")
    whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
    number = f"{whole}.{fraction}" if fraction else whole
    return number if number == "0" else sign + number


def _boxed(text: str) -> str | None:
    """The content of the last balanced, non-empty ``\\boxed{...}``, stripped."""
    found = None
    for match in BOXED.finditer(text):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found = text[match.end():end].strip() or found
                break
    return found


def extract_answer(text: str) -> str | None:
    """The answer in a text: the last ``\\boxed{...}`` (nested braces are fine), else the number after
    the last ``####`` (GSM8K), else the last number; numbers normalised (:func:`normalize_number`), a
    boxed non-number returned as written. None when there is nothing."""
    boxed = _boxed(text)
    if boxed is not None:
        return normalize_number(boxed) if NUMBER.fullmatch(boxed) else boxed
    _, marker, tail = text.rpartition("####")
    after = NUMBER.search(tail) if marker else None
    found = [after] if after else list(NUMBER.finditer(text))
    return normalize_number(found[-1].group()) if found else None


def _reference(value: Any) -> str | None:
    """A reference answer's key: its extracted answer, else its stripped text (None: no reference)."""
    if value is None:
        return None
    text = str(value)
    return extract_answer(text) or text.strip() or None


def _as_float(answer: str | None) -> float | None:
    try:
        return float(normalize_number(answer)) if answer is not None else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------
# Built-in rewards
# ------------------------------------------------------------------------------------------
class Reward:
    """A named reward function: what :func:`load_reward` returns and the factories build."""

    def __init__(self, function: Callable[..., Sequence[float | None]], name: str):
        self.function, self.name, self.__name__ = function, name, name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Sequence[float | None]:
        return self.function(prompts, completions, **columns)

    def __repr__(self) -> str:
        return f"Reward({self.name!r})"


def reward_name(reward: Callable[..., Any]) -> str:
    """A reward's name: its ``name``, else its ``__name__``, else its class's name."""
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


def exact_answer(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float | None]:
    """1.0 where the completion's answer equals the reference's (both through :func:`extract_answer`;
    a reference with no number or box counts as its text), else 0.0; None where there is no reference."""
    keys = [_reference(ref) for ref in answer]
    return [None if key is None else float(extract_answer(c) == key) for c, key in zip(completions, keys)]


def numeric_answer(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float | None]:
    """1.0 where the two answers are equal as numbers (relative tolerance 1e-6), 0.0 where they differ or
    either is not a number; None where there is no reference."""
    values = []
    for completion, ref in zip(completions, answer):
        key = _reference(ref)
        mine, theirs = _as_float(extract_answer(completion)), _as_float(key)
        values.append(None if key is None else
                      float(mine is not None and theirs is not None and math.isclose(mine, theirs, rel_tol=1e-6)))
    return values


def _on_column(function: Callable[..., list[float | None]], column: str) -> Reward:
    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        if column not in columns:
            raise DataError(f"no {column!r} column in the prompt data (it has {', '.join(sorted(columns)) or 'none'})")
        return function(prompts, completions, columns[column])

    return Reward(reward, function.__name__ if column == "answer" else f"{function.__name__}_{column}")


def exact_answer_on(column: str) -> Reward:
    """:func:`exact_answer` against the reference in another column."""
    return _on_column(exact_answer, column)


def numeric_answer_on(column: str) -> Reward:
    """:func:`numeric_answer` against the reference in another column."""
    return _on_column(numeric_answer, column)


def format_reward(pattern: str) -> Reward:
    """1.0 where ``re.search(pattern, completion, re.S)`` matches, else 0.0."""
    try:
        regex = re.compile(pattern, re.S)
    except re.error as exc:
        raise ConfigError(f"bad regular expression {pattern!r} for the format reward: {exc}") from None
    return Reward(lambda prompts, completions, **_: [float(bool(regex.search(c))) for c in completions], "format")


def length_penalty(limit: int) -> Reward:
    """0.0 up to ``limit`` characters, then ``-(len - limit) / limit``, floored at -1.0."""
    if limit < 1:
        raise ConfigError(f"the length penalty's limit must be a positive number of characters, not {limit}")
    return Reward(lambda prompts, completions, **_: [max(-1.0, -max(0, len(c) - limit) / limit) for c in completions],
                  "length")


def repetition_penalty(n: int = 3) -> Reward:
    """Minus the share of a completion's word n-grams that repeat an earlier one, in [-1, 0] (0.0 for a
    completion of fewer than ``n`` words)."""
    if n < 1:
        raise ConfigError(f"the repetition penalty's n-gram size must be positive, not {n}")

    def penalty(completion: str) -> float:
        words = completion.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return -(1.0 - len(set(grams)) / len(grams)) if grams else 0.0

    return Reward(lambda prompts, completions, **_: [penalty(c) for c in completions], "repetition")


def _load_model(checkpoint: str) -> Any:
    """The kind adapter (:mod:`lmforge.inference.kinds`) of a checkpoint, loaded on first use: importing
    the rewards loads no model."""
    from lmforge.inference.kinds import adapter_for
    from lmforge.training.checkpoint import load_model

    model, tokenizer, info = load_model(checkpoint)
    return adapter_for(model, tokenizer, dict(info.get("task") or {}))


def _classifier(checkpoint: str, label: str) -> Any:
    adapter = _load_model(checkpoint)
    labels = adapter.label_policy()[0]
    if labels is None or "classify" not in adapter.capabilities:
        raise ConfigError(f"{checkpoint} is not a classifier (train one with 'lmforge finetune --task "
                          "classification')")
    if label not in labels:
        raise ConfigError(f"the classifier {checkpoint} has no label {label!r}; its labels: {', '.join(labels)}")
    return adapter


def classifier_reward(checkpoint: str, label: str, on: str = "completion") -> Reward:
    """The probability a classifier checkpoint gives ``label`` for each completion (``on="completion"``)
    or for prompt + completion (``on="text"``). The checkpoint loads on the first call."""
    if on not in ("completion", "text"):
        raise ConfigError(f"a classifier reward scores the completion or the text, not {on!r}")
    load = functools.cache(functools.partial(_classifier, checkpoint, label))

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        texts = list(completions) if on == "completion" else [p + c for p, c in zip(prompts, completions)]
        if not texts:
            return []
        chosen, probs, _ = load().classify(texts, None, None)  # probs (N, labels)
        return probs[:, chosen.index(label)].tolist()

    return Reward(reward, f"classifier_{label}")


def _reward_model(checkpoint: str) -> Any:
    adapter = _load_model(checkpoint)
    if "reward" not in adapter.capabilities:
        raise ConfigError(f"{checkpoint} is not a reward model (train one with 'lmforge train-reward')")
    return adapter


def reward_model_reward(checkpoint: str) -> Reward:
    """A reward model checkpoint's scores of (prompt, completion); it loads on the first call."""
    load = functools.cache(functools.partial(_reward_model, checkpoint))
    return Reward(lambda prompts, completions, **_: list(load().reward(prompts, completions)) if completions else [],
                  "reward_model")


# ------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------
#: The built-in rewards' spec forms; a form without brackets needs its argument.
USAGE = {"exact_answer": "exact_answer[:COLUMN]", "numeric_answer": "numeric_answer[:COLUMN]",
         "format": "format:REGEX", "length": "length:LIMIT", "repetition": "repetition[:N]",
         "classifier": "classifier:LABEL@CHECKPOINT", "reward_model": "reward_model:CHECKPOINT"}


def _int_argument(spec: str, argument: str) -> int:
    try:
        return int(argument)
    except ValueError:
        raise ConfigError(f"reward {spec!r}: {argument!r} is not an integer") from None


def _builtin(spec: str, name: str, colon: str, argument: str) -> Reward:
    if not argument and (colon or "[" not in USAGE[name]):
        raise ConfigError(f"reward {spec!r} needs an argument: {USAGE[name].replace('[', '').replace(']', '')}")
    if name in ("exact_answer", "numeric_answer"):
        return _on_column(exact_answer if name == "exact_answer" else numeric_answer, argument or "answer")
    if name == "classifier":
        label, at, checkpoint = argument.partition("@")
        if not (label and at and checkpoint):
            raise ConfigError(f"reward {spec!r}: write classifier:LABEL@CHECKPOINT")
        return classifier_reward(checkpoint, label)
    if name == "reward_model":
        return reward_model_reward(argument)
    try:
        if name == "format":
            return format_reward(argument)
        if name == "length":
            return length_penalty(_int_argument(spec, argument))
        return repetition_penalty(_int_argument(spec, argument) if argument else 3)
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith("reward ") else f"reward {spec!r}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _import(spec: str, where: str) -> Any:
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"reward {spec!r}: no file {where}")
        name = f"_lmforge_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"reward {spec!r}: {where} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(f"reward {spec!r}: {where} does not import ({_first_line(exc)})") from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as exc:
        raise ConfigError(f"reward {spec!r}: module {where} does not import ({_first_line(exc)})") from None


def load_reward(spec: str | Callable[..., Any]) -> Reward:
    """A named reward from a spec (a callable passes through, named by its ``name`` or ``__name__``):

    * ``exact_answer``, ``numeric_answer``: against the ``answer`` column; ``exact_answer:COLUMN``,
      ``numeric_answer:COLUMN`` against another column;
    * ``format:REGEX`` (everything after the first colon), ``length:LIMIT``, ``repetition[:N]`` (N = 3);
    * ``classifier:LABEL@CHECKPOINT``, ``reward_model:CHECKPOINT``;
    * an import path, ``package.module:function`` or ``path/to/file.py:function``.

    The part before the first colon decides: a built-in name wins, else it is an import path. Every
    failure is a one-line :class:`ConfigError` naming the spec."""
    if callable(spec):
        return spec if isinstance(spec, Reward) else Reward(spec, reward_name(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a reward is a spec string or a callable, not {spec!r}")
    name, colon, argument = spec.partition(":")
    if name in USAGE:
        return _builtin(spec, name, colon, argument)
    if not (colon and name and argument):
        raise ConfigError(f"unknown reward {spec!r}: use {', '.join(USAGE.values())} or an import path "
                          "package.module:function / path/to/file.py:function")
    target: Any = _import(spec, name)
    for part in argument.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"reward {spec!r}: {name} has no attribute {argument!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"reward {spec!r}: {argument} is not callable (a {type(target).__name__})")
    return Reward(target, reward_name(target))


# ------------------------------------------------------------------------------------------
# Several rewards at once
# ------------------------------------------------------------------------------------------
@dataclass
class RewardScores:
    """A batch's rewards: the weighted total per completion, and each reward's values by name."""

    total: list[float]
    per_reward: dict[str, list[float | None]]


def _short(text: str, chars: int) -> str:
    """The first ``chars`` characters on one line (line breaks escaped), with … if there were more."""
    short = text[:chars].replace("\n", "\\n").replace("\r", "\\r")
    return short + "…" if len(text) > chars else short


def _excerpt(prompt: str) -> str:
    return f"'{_short(prompt, 60)}'"


class CombinedReward:
    """Several rewards, each called once per batch; ``total = sum of weight * value`` over the values
    that are not None (a completion where every reward is None gets 0.0). Duplicate names get a suffix
    (``format``, ``format_2``)."""

    def __init__(self, rewards: Sequence[Callable[..., Any]], weights: Sequence[float] | None = None):
        if not rewards:
            raise ConfigError("no reward functions given")
        if weights is not None and len(weights) != len(rewards):
            raise ConfigError(f"{len(weights)} reward weights for {len(rewards)} rewards")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(rewards)
        self.names: list[str] = []
        for reward in self.rewards:
            base = name = reward_name(reward)
            count = 1
            while name in self.names:
                count += 1
                name = f"{base}_{count}"
            self.names.append(name)

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: Mapping[str, Sequence[Any]] | None = None) -> RewardScores:
        columns = dict(columns or {})
        n = len(completions)
        if len(prompts) != n:
            raise DataError(f"{len(prompts)} prompts for {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise DataError(f"column {key!r} has {len(values)} values for {n} completions")
        total = [0.0] * n
        per_reward: dict[str, list[float | None]] = {}
        for name, reward, weight in zip(self.names, self.rewards, self.weights):
            values = self._run(name, reward, prompts, completions, columns) if n else []
            per_reward[name] = values
            for i, value in enumerate(values):
                if value is not None:
                    total[i] += weight * value
        return RewardScores(total, per_reward)

    @staticmethod
    def _run(name: str, reward: Callable[..., Any], prompts: list[str], completions: list[str],
             columns: dict[str, Any]) -> list[float | None]:
        where = _excerpt(prompts[0])
        try:
            raw = reward(prompts, completions, **columns)
        except (ConfigError, CheckpointError):
            raise  # a wrong checkpoint or label is the run's configuration, not the batch
        except Exception as exc:
            raise DataError(f"reward {name!r} failed on prompt {where}: {_first_line(exc)}") from exc
        if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__len__") or not hasattr(raw, "__iter__"):
            raise DataError(f"reward {name!r} returned a {type(raw).__name__}, not a list of {len(completions)} "
                            f"values (prompt {where})")
        if len(raw) != len(completions):
            raise DataError(f"reward {name!r} returned {len(raw)} values for {len(completions)} completions "
                            f"(prompt {where})")
        values: list[float | None] = []
        for i, value in enumerate(raw):
            number = None
            if value is not None and not isinstance(value, (str, bytes)):
                try:
                    number = float(value) if isinstance(value, numbers.Real) or hasattr(value, "__float__") else None
                except (TypeError, ValueError):
                    number = None
            if value is not None and (number is None or not math.isfinite(number)):
                raise DataError(f"reward {name!r} gave {_short(repr(value), 40)} for prompt "
                                f"{_excerpt(prompts[i])}: a reward is a finite number or None")
            values.append(number)
        return values


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------
def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0  # the sample std, as torch.std


def reward_metrics(scores: RewardScores, group_size: int) -> dict[str, float]:
    """TRL's reward metrics of a batch ordered group by group (``group_size`` completions per prompt):
    ``reward`` (mean total), ``reward_std`` (mean of each group's sample std), ``rewards/NAME/mean`` and
    ``rewards/NAME/std`` (over the applicable values; a reward with none is left out) and
    ``frac_reward_zero_std`` (share of groups whose totals are all equal). An empty batch gives {}."""
    total = scores.total
    if group_size < 1 or len(total) % group_size:
        raise ConfigError(f"a group of {group_size} completions does not divide {len(total)} rewards")
    if not total:
        return {}
    stds = [_std(total[i:i + group_size]) for i in range(0, len(total), group_size)]
    metrics = {"reward": statistics.fmean(total), "reward_std": statistics.fmean(stds)}
    for name, values in scores.per_reward.items():
        applicable = [v for v in values if v is not None]
        if applicable:
            metrics[f"rewards/{name}/mean"] = statistics.fmean(applicable)
            metrics[f"rewards/{name}/std"] = _std(applicable)
    metrics["frac_reward_zero_std"] = statistics.fmean(float(math.isclose(s, 0.0, abs_tol=1e-8)) for s in stds)
    return metrics

"""Text environments: episodes in which the model's turns are generated (and trained on) and the
environment's turns are not (masked out of the policy loss).

An :class:`Environment` starts an episode from a row of the prompt data (:meth:`~Environment.reset`
gives the first observation, the prompt) and answers each model turn (:meth:`~Environment.step`: the
next observation, a reward or None, and whether the episode is over). A reward of None means "score the
episode with the run's reward functions" (:mod:`lmforge.alignment.rewards`), which see the prompt and
the model's last turn as the completion, and every column of the row by name.

Shipped environments:

* :class:`SingleTurn`: answer once and be scored (what every reward runs in).
* :class:`Calculator`: the model may write a calculator call, ``<calc>37*48</calc>``; the environment
  appends ``<result>1776</result>`` and the episode goes on, until a turn without a call (the answer)
  or the turn limit.

:func:`run_episodes` plays a batch of episodes with a ``generate`` function (by default the one
generation loop, :func:`lmforge.inference.completion.complete`), turn by turn, all active episodes in
one batch. An :class:`Episode` keeps every turn's token ids as they were generated or encoded, so
``ids``/``trained_mask`` are exact: a model turn's ids are the generated ones (with the end-of-sequence
token when the model chose it), never a re-encoding.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError, ContextLengthError, DataError
from lmforge.inference.completion import Completion, complete
from lmforge.inference.prompts import Prompt, encode_prompt, fit_prompt
from lmforge.tokenizer import Tokenizer


class Environment(Protocol):
    """One episode's environment (a new instance per episode)."""

    stop: Sequence[str]  # strings that end a model turn early (e.g. the end of a tool call); may be empty

    def reset(self, row: dict[str, Any]) -> str:
        """Start an episode from a row of the prompt data; returns the first observation (the prompt)."""
        ...

    def step(self, text: str) -> tuple[str | None, float | None, bool]:
        """Answer a model turn: ``(observation or None, reward or None, done)``."""
        ...


def prompt_of(row: dict[str, Any], column: str = "prompt") -> str:
    """The prompt text of a row, or a one-line :class:`DataError`."""
    value = row.get(column)
    if not isinstance(value, str) or not value:
        raise DataError(f"a prompt row needs a non-empty text {column!r} column, got {sorted(row)}"[:200])
    return value


class SingleTurn:
    """Answer once; the run's reward functions score the answer."""

    stop: Sequence[str] = ()

    def __init__(self, column: str = "prompt"):
        self.column = column

    def reset(self, row: dict[str, Any]) -> str:
        return prompt_of(row, self.column)

    def step(self, text: str) -> tuple[str | None, float | None, bool]:
        return None, None, True


CALL = re.compile(r"<calc>(.*?)</calc>", re.S)


class Calculator:
    """A tool environment: each ``<calc>EXPRESSION</calc>`` the model writes is evaluated
    (:func:`calculate`: numbers, + - * / // % ** and parentheses) and answered with
    ``<result>VALUE</result>`` (or ``<result>error</result>``); a turn without a call is the answer,
    which the run's reward functions score. ``instructions``, if given, is put after the prompt."""

    stop: Sequence[str] = ("</calc>",)

    def __init__(self, column: str = "prompt", instructions: str = ""):
        self.column, self.instructions = column, instructions

    def reset(self, row: dict[str, Any]) -> str:
        return prompt_of(row, self.column) + self.instructions

    def step(self, text: str) -> tuple[str | None, float | None, bool]:
        calls = CALL.findall(text)
        if not calls:
            return None, None, True
        try:
            value = format_number(calculate(calls[-1]))
        except ValueError:
            value = "error"
        return f"<result>{value}</result>", None, False


_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
MAX_MAGNITUDE = 10.0 ** 30  # larger intermediate results are refused (no 9**9**9 on a CPU)


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression, computed from its syntax tree (never ``eval``): numbers,
    ``+ - * / // % **``, unary minus and parentheses. Anything else, a division by zero or a value
    beyond ``MAX_MAGNITUDE`` raises ValueError."""
    if len(expression) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression.strip().replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        result = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        result = -_value(node.operand) if isinstance(node.op, ast.USub) else _value(node.operand)
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10 ** 6):
            raise ValueError("power too large")
        try:
            result = _OPERATORS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as exc:
            raise ValueError(str(exc)) from None
        if isinstance(result, complex):
            raise ValueError("not a real number")
    else:
        raise ValueError(f"not allowed in a calculation: {type(node).__name__}")
    if (isinstance(result, float) and not math.isfinite(result)) or abs(result) > MAX_MAGNITUDE:
        raise ValueError("value too large")
    return result


def format_number(value: float | int) -> str:
    """``1776``, ``-3``, ``0.5``, ``3.333333``: whole numbers without a decimal point."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.6f}".rstrip("0").rstrip(".")


@dataclass
class Turn:
    """One turn of an episode: its token ids and text, and whether the model wrote it (trained on)."""

    ids: list[int]
    text: str
    trained: bool


@dataclass
class Episode:
    """A played episode: its row, its turns (the first is the prompt), and how it ended."""

    row: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)
    reward: float | None = None  # the environment's reward, or None: score with the run's rewards
    finish: str = ""             # "done" (the environment ended it), "turns" (the limit) or "context"
    truncated: bool = False      # the model's last turn hit max_new_tokens

    @property
    def ids(self) -> list[int]:
        """Every token of the episode, prompt first."""
        return [token for turn in self.turns for token in turn.ids]

    @property
    def trained_mask(self) -> list[bool]:
        """Per token of :attr:`ids`: True where the model wrote it (the policy loss reads only those)."""
        return [turn.trained for turn in self.turns for _ in turn.ids]

    @property
    def prompt(self) -> str:
        return self.turns[0].text

    @property
    def completion(self) -> str:
        """The model's last turn (what the run's rewards score), or "" if it wrote nothing."""
        return next((turn.text for turn in reversed(self.turns) if turn.trained), "")

    @property
    def transcript(self) -> str:
        """Everything after the prompt, the model's and the environment's turns."""
        return "".join(turn.text for turn in self.turns[1:])


Generate = Callable[[list[Prompt]], list[Completion]]


def run_episodes(environments: Sequence[Environment], rows: Sequence[dict[str, Any]], tokenizer: Tokenizer,
                 context: int, generate: Generate, max_turns: int = 1) -> list[Episode]:
    """Play one episode per (environment, row), at most ``max_turns`` model turns each; every turn,
    the active episodes are generated for as one batch by ``generate`` (prompt ids -> completions,
    e.g. :func:`policy_generate`). An episode whose next prompt would not fit the ``context`` (one new
    token at least) ends with ``finish == "context"``."""
    if len(environments) != len(rows):
        raise ConfigError(f"{len(environments)} environments for {len(rows)} rows")
    if max_turns < 1:
        raise ConfigError(f"max_turns must be >= 1, not {max_turns}")
    episodes = []
    for environment, row in zip(environments, rows):
        first = environment.reset(row)
        episodes.append(Episode(dict(row), [Turn(encode_prompt(tokenizer, first), first, False)]))
    active = list(range(len(episodes)))
    for turn in range(max_turns):
        prompts, playing = [], []
        for i in active:
            try:
                prompts.append(fit_prompt(episodes[i].ids, tokenizer, context, room=1, what="episode"))
                playing.append(i)
            except ContextLengthError:
                episodes[i].finish = "context"
        active = []
        for i, completion in zip(playing, generate(prompts) if prompts else []):
            episode, environment = episodes[i], environments[i]
            text = tokenizer.decode(completion.token_ids)  # with the stop string that ended the turn
            eos = [tokenizer.eos_id] if completion.eos and tokenizer.eos_id is not None else []
            episode.turns.append(Turn(list(completion.token_ids) + eos, text, True))  # the policy chose the eos too
            episode.truncated = completion.finish_reason == "length"
            observation, reward, done = environment.step(text)
            if done:
                episode.reward, episode.finish = reward, "done"
            elif turn == max_turns - 1:
                episode.finish = "turns"
            else:
                if observation:
                    episode.turns.append(Turn(tokenizer.encode(observation), observation, False))
                active.append(i)
    return episodes


def policy_generate(model: Any, tokenizer: Tokenizer, sampling: SamplingConfig,
                    environments: Sequence[Environment] = ()) -> Generate:
    """A ``generate`` for :func:`run_episodes`: the one generation loop on ``model``, one sample per
    prompt, stopping also at the environments' stop strings."""
    stops = list(dict.fromkeys([*sampling.stop, *(s for e in environments for s in e.stop)]))
    config = SamplingConfig.from_options(sampling, num_samples=1, stop=stops)
    return lambda prompts: complete(model, tokenizer, prompts, config)

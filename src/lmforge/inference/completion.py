"""The generation loop: prompt ids in, text pieces and :class:`Completion` objects out.

:func:`stream_completions` is the one place that drives a :class:`TokenGenerator` over a batch of
prompts: it turns token steps into text with :class:`TextStream` (stop strings, whole characters),
stops rows at end-of-sequence or a stop string, and yields ``(row, piece)`` as text becomes final,
then one :class:`Completion` per row. :func:`complete_ids` runs it over many prompts in batches of
similar lengths (the evaluation harness, fine-tuning's generation metrics). Both need only ``model``
and ``tokenizer``, so a training loop can call them on the model it is training (it is put in eval mode
for the call and restored afterwards).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError
from lmforge.inference.detokenize import TextStream
from lmforge.inference.generate import TokenGenerator
from lmforge.inference.prompts import Prompt, fit_prompt
from lmforge.models import eval_mode
from lmforge.tokenizer import Tokenizer


@dataclass
class Completion:
    """One generated sample."""

    text: str
    token_ids: list[int]      # generated tokens, without the end-of-sequence token
    finish_reason: str        # "stop" (end-of-sequence token or stop string) or "length"
    prompt_tokens: int        # prompt length after truncation
    prompt_truncated: int = 0  # prompt tokens dropped from the start to fit the context
    eos: bool = False         # it ended with the end-of-sequence token


def stream_completions(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                       config: SamplingConfig) -> Iterator[tuple[int, str] | Completion]:
    """Generate ``config.num_samples`` samples of every prompt, as one batch; rows are the samples
    of each prompt together, prompt after prompt. Yields ``(row, text piece)`` as text becomes final,
    then one :class:`Completion` per row, in row order."""
    rows = [p.ids for p in prompts for _ in range(config.num_samples)]
    dropped = [p.dropped for p in prompts for _ in range(config.num_samples)]
    streams = [TextStream(tokenizer, config.stop) for _ in rows]
    generated: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    ended_by_eos = [False] * len(rows)
    eos = None if config.ignore_eos else tokenizer.eos_id
    with eval_mode(model):
        generator = TokenGenerator(model, rows, config, eos, tokenizer.pad_id or 0)
        for next_ids in generator:
            done = []
            for row, token in enumerate(next_ids.tolist()):
                if reasons[row] == "stop":
                    continue
                if token == eos:
                    reasons[row], ended_by_eos[row] = "stop", True
                    continue
                generated[row].append(token)
                piece = streams[row].push(token)
                if piece:
                    yield row, piece
                if streams[row].stopped:
                    reasons[row] = "stop"
                    done.append(row)
            if done:
                generator.finish(done)
    for row, stream in enumerate(streams):
        rest = stream.close()
        if rest:
            yield row, rest
        yield Completion(stream.text, generated[row], reasons[row], len(rows[row]), dropped[row], ended_by_eos[row])


def complete(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt],
             config: SamplingConfig) -> list[Completion]:
    """Every :class:`Completion` of :func:`stream_completions` (the text pieces dropped)."""
    return [event for event in stream_completions(model, tokenizer, prompts, config) if isinstance(event, Completion)]


def complete_ids(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                 sampling: SamplingConfig | None = None, batch_size: int = 16, progress: Any = None,
                 **options: Any) -> list[Completion]:
    """Generate for prompts given as token ids; returns ``len(prompts) * num_samples`` completions,
    the samples of each prompt together, in prompt order.

    ``sampling`` updated by the keyword ``options`` (:meth:`SamplingConfig.from_options`) says how;
    prompts longer than the context lose their start, leaving room for ``max_new_tokens`` (at most
    half the context). Batches hold prompts of similar lengths; with a ``seed``, batch ``k`` samples
    with ``seed + k``, so results depend on ``batch_size`` but are reproducible. ``progress``
    (anything with ``update(n)``) advances by the number of prompts of each batch.
    """
    config = SamplingConfig.from_options(sampling, **options)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    context = model.config.block_size
    room = min(config.max_new_tokens, context // 2)
    fitted = [fit_prompt(p, tokenizer, context, room=room, truncate=True) for p in prompts]
    order = sorted(range(len(fitted)), key=lambda i: len(fitted[i].ids))
    results: list[list[Completion]] = [[] for _ in fitted]
    for number, start in enumerate(range(0, len(order), batch_size)):
        chosen = order[start:start + batch_size]
        batch_config = config if config.seed is None else dataclasses.replace(config, seed=config.seed + number)
        owners = [i for i in chosen for _ in range(config.num_samples)]
        for owner, completion in zip(owners, complete(model, tokenizer, [fitted[i] for i in chosen], batch_config)):
            results[owner].append(completion)
        if progress is not None:
            progress.update(len(chosen))
    return [c for group in results for c in group]

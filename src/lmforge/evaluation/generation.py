"""Batched generation from token ids, on a bare model and tokenizer.

:class:`LanguageModel.complete` takes prompt *strings*; evaluation data often arrives as token ids
already (chat templates rendered with special tokens, truncated contexts), which do not always
survive a decode/encode round trip. :func:`generate_ids` generates from ids with the same
machinery (:class:`TokenGenerator` + :class:`TextStream` for stop strings), in batches of similar
lengths. It needs only ``model`` and ``tokenizer``, so a training loop can call it on the model it is
training (the model is put in eval mode for the call and restored afterwards).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError
from lmforge.inference.detokenize import TextStream
from lmforge.inference.generate import TokenGenerator
from lmforge.models import eval_mode
from lmforge.options import build_dataclass
from lmforge.tokenizer import Tokenizer


@dataclass
class Generation:
    """One generated sample."""

    text: str
    token_ids: list[int]   # generated tokens, without the end-of-sequence token
    finish_reason: str     # "eos" (end-of-sequence token), "stop" (a stop string) or "length"
    prompt_tokens: int     # prompt length after truncation
    prompt_truncated: int  # prompt tokens dropped from the start to fit the context


def make_sampling(sampling: SamplingConfig | None = None, **options: Any) -> SamplingConfig:
    """A validated :class:`SamplingConfig`: ``sampling`` (or the defaults) updated by ``options``
    (``None`` values are ignored; unknown names are a ConfigError)."""
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    base = dataclasses.asdict(sampling) if sampling is not None else {}
    config = build_dataclass(SamplingConfig, {**base, **options})
    config.validate()
    return config


def fit_prompt(ids: Sequence[int], tokenizer: Tokenizer, context: int, reserve: int) -> tuple[list[int], int]:
    """``ids`` cut to leave room for ``reserve`` new tokens (at most half the context): the start
    goes, a leading bos is kept. An empty prompt becomes the start-of-document token. Returns the ids
    and how many were dropped."""
    ids = list(ids) or list(tokenizer.start_ids)
    limit = context - min(reserve, context // 2)
    if len(ids) <= limit:
        return ids, 0
    head = ids[:1] if tokenizer.adds_bos and ids[0] == tokenizer.bos_id else []
    keep = max(1, limit - len(head))
    return head + ids[-keep:], len(ids) - len(head) - keep


def generate_ids(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                 sampling: SamplingConfig | None = None, batch_size: int = 16, progress: Any = None,
                 **options: Any) -> list[Generation]:
    """Generate for prompts given as token ids; returns ``len(prompts) * num_samples`` generations,
    the samples of each prompt together, in prompt order.

    ``sampling`` and the keyword ``options`` (:class:`SamplingConfig` fields) say how; prompts longer
    than the context lose their start. Batches hold prompts of similar lengths; with a ``seed``,
    batch ``k`` samples with ``seed + k``, so results depend on ``batch_size`` but are reproducible.
    ``progress`` (anything with ``update(n)``) advances by the number of prompts of each batch.
    """
    config = make_sampling(sampling, **options)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    context = model.config.block_size
    fitted = [fit_prompt(p, tokenizer, context, config.max_new_tokens) for p in prompts]
    order = sorted(range(len(fitted)), key=lambda i: len(fitted[i][0]))
    results: list[list[Generation]] = [[] for _ in fitted]
    eos = None if config.ignore_eos else tokenizer.eos_id
    with eval_mode(model):
        for number, start in enumerate(range(0, len(order), batch_size)):
            chosen = order[start:start + batch_size]
            batch_config = config
            if config.seed is not None:
                batch_config = dataclasses.replace(config, seed=config.seed + number)
            rows = [fitted[i][0] for i in chosen for _ in range(config.num_samples)]
            owners = [i for i in chosen for _ in range(config.num_samples)]
            for owner, generation in zip(owners, _generate_batch(model, tokenizer, rows, batch_config, eos)):
                generation.prompt_truncated = fitted[owner][1]
                results[owner].append(generation)
            if progress is not None:
                progress.update(len(chosen))
    return [g for group in results for g in group]


def _generate_batch(model: nn.Module, tokenizer: Tokenizer, rows: list[list[int]], config: SamplingConfig,
                    eos: int | None) -> list[Generation]:
    streams = [TextStream(tokenizer, config.stop) for _ in rows] if config.stop else None
    generated: list[list[int]] = [[] for _ in rows]
    reasons: list[str | None] = [None] * len(rows)
    generator = TokenGenerator(model, rows, config, eos, tokenizer.pad_id or 0)
    for next_ids in generator:
        done = []
        for row, token in enumerate(next_ids.tolist()):
            if reasons[row] is not None:
                continue
            if token == eos:
                reasons[row] = "eos"
                continue
            generated[row].append(token)
            if streams is not None:
                streams[row].push(token)
                if streams[row].stopped:
                    reasons[row] = "stop"
                    done.append(row)
        if done:
            generator.finish(done)
    out = []
    for row, ids in enumerate(generated):
        if streams is not None:
            streams[row].close()
            text = streams[row].text
        else:
            text = tokenizer.decode(ids)
        out.append(Generation(text, ids, reasons[row] or "length", len(rows[row]), 0))
    return out

"""Scoring text with a causal language model: token log-probabilities, candidate labels, continuations.

Everything here takes a bare ``model`` and ``tokenizer``, so the API, the evaluation harness, the
server and a training loop (on the model it is training: put in eval mode for the call and restored)
share one implementation. Texts are scored after the start-of-document token
(:attr:`Tokenizer.start_ids`), so every token of a text has a probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError, DataError
from lmforge.inference.prompts import CLASSIFICATION_TEMPLATE, document_head
from lmforge.models import eval_mode
from lmforge.tokenizer import Tokenizer

LOGIT_BUDGET = 1 << 26  # logits (rows * tokens * vocabulary) computed per forward pass


@torch.inference_mode()
def token_logprobs(model: nn.Module, tokenizer: Tokenizer, text: str, stride: int | None = None) -> torch.Tensor:
    """Log-probability of every token of ``text`` given the ones before it (the first given the
    start-of-document token). Texts longer than the context are scored with sliding windows that
    advance by ``stride`` tokens (default: the context; smaller strides give each token more context).
    Returns a 1-D float tensor on the CPU, one entry per token."""
    ids = document_head(tokenizer) + tokenizer.encode(text)
    block = model.config.block_size
    stride = block if stride is None else stride
    if not 0 < stride <= block:
        raise ConfigError(f"stride must be between 1 and the context ({block}), not {stride}")
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    scores = torch.empty(len(ids) - 1, device=device)
    windows = []  # (start, first, end): window tokens [start, end) score targets [first, end)
    first = 1
    while first < len(ids):
        end = min(first + (stride if first > 1 else block), len(ids))
        windows.append((max(0, end - block - 1), first, end))
        first = end
    batch_size = max(1, 16384 // block)
    with eval_mode(model):
        for i in range(0, len(windows), batch_size):  # windows of equal length share a forward pass
            group = [w for w in windows[i:i + batch_size] if w[2] - w[0] == windows[i][2] - windows[i][0]]
            rest = [w for w in windows[i:i + batch_size] if w not in group]
            for chunk in (group, *([w] for w in rest)):
                batch = torch.stack([tokens[start:end] for start, _, end in chunk])  # (B, T + 1)
                logprobs = model(batch[:, :-1]).float().log_softmax(-1)
                logprobs = logprobs.gather(-1, batch[:, 1:, None])[..., 0]  # (B, T)
                for row, (start, first, end) in enumerate(chunk):
                    scores[first - 1:end - 1] = logprobs[row, first - start - 1:]
    return scores.cpu()


@torch.inference_mode()
def continuation_logprob(model: nn.Module, prompt: Sequence[int], continuation: Sequence[int]) -> float:
    """Mean log-probability of the ``continuation`` tokens after ``prompt`` (NaN for none)."""
    if not continuation:
        return float("nan")
    device = next(model.parameters()).device
    tokens = torch.tensor([list(prompt) + list(continuation)], device=device)
    with eval_mode(model):
        logprobs = model(tokens[:, :-1]).float().log_softmax(-1)[0, len(prompt) - 1:]
    return float(logprobs.gather(-1, tokens[0, len(prompt):, None]).mean())


def split_label_template(template: str) -> tuple[str, str, str]:
    """(prompt with {text}, the spaces that start the label, what follows the label)."""
    if template.count("{text}") != 1 or template.count("{label}") != 1 or \
            template.index("{label}") < template.index("{text}"):
        raise ConfigError(f"a classification template needs one {{text}} and after it one {{label}}, e.g. "
                          f"{CLASSIFICATION_TEMPLATE!r}; got {template!r}")
    before, after = template.split("{label}")
    prompt = before.rstrip(" ")
    return prompt, before[len(prompt):], after


def label_scores(lm: Any, texts: Sequence[str], labels: Sequence[str], template: str = CLASSIFICATION_TEMPLATE,
                 normalize: bool = False, progress: Any = None) -> torch.Tensor:
    """Log-likelihood of each candidate label given each text: a float tensor (N texts, L labels).

    Entry ``[i, j]`` is log P(label j | prompt i) in nats: the sum of the log-probabilities of the
    label's tokens after ``template`` filled with text ``i`` up to ``{label}`` (and after the
    start-of-document token, as :func:`token_logprobs` scores texts); with ``normalize`` the mean per
    label token instead. The template's spaces before ``{label}`` and anything after it are scored with
    the label. Texts too long for the context lose their start. ``lm`` needs only ``model`` and
    ``tokenizer`` attributes (a training loop can pass its own); see :func:`label_logprobs`.
    """
    return label_logprobs(lm.model, lm.tokenizer, texts, labels, template, normalize, progress)[0]


def label_logprobs(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[str],
                   template: str = CLASSIFICATION_TEMPLATE, normalize: bool = False,
                   progress: Any = None) -> tuple[torch.Tensor, int]:
    """:func:`label_scores` on a bare model, and how many texts lost their start to fit. All N x L
    sequences run in batched forward passes; ``progress`` (``update(n)``) advances per sequence."""
    if isinstance(texts, str) or isinstance(labels, str):
        raise DataError("label_scores takes lists of texts and of labels")
    if not texts or not labels:
        raise DataError("label_scores needs at least one text and one label")
    prompt_template, space, after = split_label_template(template)
    label_ids = [tokenizer.encode(space + str(label) + after) for label in labels]
    if any(not ids for ids in label_ids):
        raise DataError("a candidate label is empty")
    context = model.config.block_size
    head = document_head(tokenizer)
    longest = max(map(len, label_ids))
    room = context + 1 - len(head) - longest  # the model reads every token but the last
    if room < 1:
        raise DataError(f"a label of {longest} tokens does not fit the model's context of {context}")
    prompts, truncated = [], 0
    for text in texts:
        body = tokenizer.encode(prompt_template.replace("{text}", text))
        if len(body) > room:
            body, truncated = body[len(body) - room:], truncated + 1
        prompts.append(head + body)
    # Every (text, label) pair is one sequence; similar lengths share a forward pass.
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(label_ids))]
    pairs.sort(key=lambda p: len(prompts[p[0]]) + len(label_ids[p[1]]))
    scores = torch.empty(len(prompts), len(label_ids), dtype=torch.float64)
    start = 0
    with eval_mode(model), torch.inference_mode():
        while start < len(pairs):
            rows, T = _chunk_size(pairs, start, prompts, label_ids, model.config.vocab_size)
            chunk = pairs[start:start + rows]
            logprobs = _chunk_logprobs(model, [prompts[i] for i, _ in chunk], [label_ids[j] for _, j in chunk], T,
                                       tokenizer.pad_id or 0, normalize)
            for row, (i, j) in enumerate(chunk):
                scores[i, j] = logprobs[row]
            if progress is not None:
                progress.update(rows)
            start += rows
    return scores, truncated


def _chunk_size(pairs: list[tuple[int, int]], start: int, prompts: list[list[int]], label_ids: list[list[int]],
                vocab: int) -> tuple[int, int]:
    """How many pairs from ``start`` share a forward pass (their logits fit the budget), and its length."""
    T = len(prompts[pairs[start][0]]) + len(label_ids[pairs[start][1]]) - 1
    rows = 1
    while start + rows < len(pairs):
        i, j = pairs[start + rows]
        T_next = max(T, len(prompts[i]) + len(label_ids[j]) - 1)
        if (rows + 1) * T_next * vocab > LOGIT_BUDGET:
            break
        rows, T = rows + 1, T_next
    return rows, T


def _chunk_logprobs(model: nn.Module, prompts: list[list[int]], labels: list[list[int]], T: int, pad: int,
                    normalize: bool) -> torch.Tensor:
    """(B,) summed (or mean) log-probabilities of each row's label tokens after its prompt."""
    rows, K = len(prompts), max(map(len, labels))
    device = next(model.parameters()).device
    inputs = torch.full((rows, T), pad, dtype=torch.long)       # right-padded: causal attention
    positions = torch.zeros((rows, K), dtype=torch.long)        # never lets padding reach
    targets = torch.zeros((rows, K), dtype=torch.long)          # the positions we read
    mask = torch.zeros((rows, K), dtype=torch.bool)
    for row, (prompt, label) in enumerate(zip(prompts, labels)):
        sequence = prompt + label
        inputs[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        n, first = len(label), len(prompt) - 1
        positions[row, :n] = torch.arange(first, first + n)
        targets[row, :n] = torch.tensor(label)
        mask[row, :n] = True
    logits = model(inputs.to(device))                                                   # (B, T, V)
    picked = logits[torch.arange(rows, device=device)[:, None], positions.to(device)]  # (B, K, V)
    logprobs = picked.float().log_softmax(-1).gather(-1, targets.to(device)[..., None])[..., 0]
    logprobs = (logprobs.double().cpu() * mask).sum(-1)                                 # (B,)
    return logprobs / mask.sum(-1) if normalize else logprobs

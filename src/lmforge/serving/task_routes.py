"""Task endpoints: ``POST /v1/generate``, ``/v1/summarize``, ``/v1/translate``, ``/v1/classify``,
``/v1/answer``: JSON in, JSON out, each a thin layer over a :class:`TaskModel`.

:class:`PromptTasks` serves every task with the loaded decoder: the prompts of
:func:`lmforge.inference.prompts.task_prompt` (the same ids as :class:`LanguageModel`'s task methods),
decoded by the server's engine (so they share its batches, limits and metrics), and label likelihood
scoring (:func:`lmforge.inference.scoring.label_logprobs`) for classification. Any other checkpoint is
served by :class:`CheckpointTasks`, which calls :class:`LanguageModel`'s task methods. A
task-specialised model plugs in by implementing :class:`TaskModel` and being set as the server's
``tasks``.

A task input too long for the context is a 400 ``context_length_exceeded`` naming the field, as
:class:`LanguageModel` raises a :class:`~lmforge.errors.ContextLengthError`; with ``"truncate": true``
the document (the text, or the question's context) loses its start instead, as with ``truncate=True``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from pydantic import Field, field_validator

from lmforge.api import LanguageModel
from lmforge.config import SamplingConfig
from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine
from lmforge.inference.kinds import ANSWER_DEFAULTS
from lmforge.inference.prompts import (
    CLASSIFICATION_TEMPLATE,
    SUMMARIZE_TEMPLATE,
    TRANSLATE_TEMPLATE,
    Prompt,
    task_prompt,
)
from lmforge.inference.scoring import label_logprobs
from lmforge.serving.engine_requests import EngineRequests, encode_engine_prompt, sampling_options
from lmforge.serving.errors import APIError, check_max_tokens, from_lmforge_error
from lmforge.serving.schemas import RequestBody, SamplingFields
from lmforge.serving.state import authorize, server_of, set_usage

__all__ = ["SUMMARIZE_TEMPLATE", "TRANSLATE_TEMPLATE", "CheckpointTasks", "PromptTasks", "TaskAnswer", "TaskModel",
           "router"]



@dataclass(frozen=True)
class TaskAnswer:
    """A generated answer and its token counts (an extractive answer also has a score and its
    character span in the context)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    score: float | None = None
    span: tuple[int, int] | None = None


class TaskModel(Protocol):
    """What the task endpoints need. ``request`` is the HTTP request (for accounting and timeouts);
    ``truncate`` asks that a document too long for the context lose its start instead of a 400.

    A model may also declare the attributes below (:func:`label_policy` reads them, with these
    defaults): its own ``labels`` (used when a classify request gives none), whether they are
    independent (``multi_label``: each label its own probability) and their per-label ``thresholds``.
    """

    labels: list[str] | None = None
    multi_label: bool = False
    thresholds: dict[str, float] = {}  # noqa: RUF012 (a documented default, never mutated)

    async def summarize(self, request: Request, text: str, sampling: SamplingConfig,
                        truncate: bool = False) -> TaskAnswer: ...

    async def translate(self, request: Request, text: str, source: str | None, target: str,
                        sampling: SamplingConfig, truncate: bool = False) -> TaskAnswer: ...

    async def answer(self, request: Request, question: str, context: str, sampling: SamplingConfig,
                     truncate: bool = False) -> TaskAnswer: ...

    async def classify(self, request: Request, text: str, labels: list[str]) -> list[float]:
        """Log-likelihood (nats) of each label for ``text``."""
        ...


def label_policy(tasks: Any) -> tuple[list[str] | None, bool, dict[str, float]]:
    """A task model's declared ``labels``, ``multi_label`` and ``thresholds`` (:class:`TaskModel`)."""
    return (getattr(tasks, "labels", TaskModel.labels), getattr(tasks, "multi_label", TaskModel.multi_label),
            getattr(tasks, "thresholds", TaskModel.thresholds))


class PromptTasks:
    """Every task from a decoder language model: :func:`~lmforge.inference.prompts.task_prompt`, then
    generation by the server's engine (the filled template is a user message when the tokenizer has a
    chat template)."""

    def __init__(self, lm: LanguageModel, engine: Engine):
        self.lm, self.engine = lm, engine

    async def generate(self, request: Request, prompt: str, sampling: SamplingConfig,
                       truncate: bool = False) -> TaskAnswer:
        """Generate after a plain ``prompt`` (with ``truncate``, one too long loses its start)."""
        ids = encode_engine_prompt(self.lm, prompt, truncate=truncate, reserve=sampling.max_new_tokens)
        return await self._generate(request, ids, prompt, sampling)

    async def _task(self, request: Request, task: str, fields: dict[str, str], sampling: SamplingConfig,
                    truncate: bool) -> TaskAnswer:
        try:
            prompt: Prompt = task_prompt(self.lm.tokenizer, task, fields, self.lm.context_length,
                                         reserve=sampling.max_new_tokens, truncate=truncate)
        except LmforgeError as exc:
            raise from_lmforge_error(exc) from None
        return await self._generate(request, prompt.ids, "\n".join(fields.values()), sampling)

    async def _generate(self, request: Request, ids: list[int], text: str, sampling: SamplingConfig) -> TaskAnswer:
        set_usage(request, prompt_tokens=len(ids), prompt=text)
        result = (await EngineRequests(server_of(request), request, self.engine, [ids], sampling).results())[0]
        finish = "length" if result.finish_reason == "length" else "stop"
        return TaskAnswer(result.text.strip(), finish, len(ids), result.completion_tokens)

    async def summarize(self, request: Request, text: str, sampling: SamplingConfig,
                        truncate: bool = False) -> TaskAnswer:
        return await self._task(request, "summarize", {"text": text}, sampling, truncate)

    async def translate(self, request: Request, text: str, source: str | None, target: str,
                        sampling: SamplingConfig, truncate: bool = False) -> TaskAnswer:
        fields = {"text": text, "source": source or "the source language", "target": target}
        return await self._task(request, "translate", fields, sampling, truncate)

    async def answer(self, request: Request, question: str, context: str, sampling: SamplingConfig,
                     truncate: bool = False) -> TaskAnswer:
        return await self._task(request, "answer", {"question": question, "context": context}, sampling, truncate)

    async def classify(self, request: Request, text: str, labels: list[str]) -> list[float]:
        set_usage(request, prompt=text, prompt_tokens=len(self.lm.tokenizer.encode(text)))
        score = functools.partial(label_logprobs, self.lm.model, self.lm.tokenizer, [text], labels,
                                  CLASSIFICATION_TEMPLATE)
        try:  # forward passes of their own, run by the engine's thread between two decoding steps
            scores, _ = await asyncio.wrap_future(self.engine.call(score))
        except LmforgeError as exc:
            raise APIError(400, str(exc), param="labels") from None
        return scores[0].tolist()


class CheckpointTasks:
    """The tasks of any checkpoint the engine does not decode (a classifier, an extractive QA model,
    an encoder-decoder, an LSTM): :class:`LanguageModel`'s task methods, run by the engine's thread
    (:meth:`Engine.call`) so that one thread does all the computing. What the checkpoint cannot do is
    a 400 naming what it can. A classifier also tells the classify route its own ``labels`` and
    whether they are independent (``multi_label``, with per-label ``thresholds``)."""

    def __init__(self, lm: LanguageModel, engine: Engine):
        self.lm, self.engine = lm, engine
        self.labels, self.multi_label, self.thresholds = lm.adapter.label_policy()

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.wrap_future(self.engine.call(functools.partial(method, *args, **kwargs)))
        except LmforgeError as exc:
            raise from_lmforge_error(exc) from None

    async def _generated(self, request: Request, method: Any, text: str, sampling: SamplingConfig,
                         **kwargs: Any) -> TaskAnswer:
        prompt_tokens = len(self.lm.tokenizer.encode(text))
        set_usage(request, prompt_tokens=prompt_tokens, prompt=text)
        options = {k: v for k, v in dataclasses.asdict(sampling).items() if k not in ("num_samples", "stop") or v}
        output = await self._call(method, text, **kwargs, **options)
        tokens = len(self.lm.tokenizer.encode(output))
        set_usage(request, completion_tokens=tokens)
        return TaskAnswer(output, "length" if tokens >= sampling.max_new_tokens else "stop", prompt_tokens, tokens)

    async def generate(self, request: Request, prompt: str, sampling: SamplingConfig,
                       truncate: bool = False) -> TaskAnswer:
        return await self._generated(request, self.lm.generate, prompt, sampling, truncate=truncate)

    async def summarize(self, request: Request, text: str, sampling: SamplingConfig,
                        truncate: bool = False) -> TaskAnswer:
        return await self._generated(request, self.lm.summarize, text, sampling, truncate=truncate)

    async def translate(self, request: Request, text: str, source: str | None, target: str,
                        sampling: SamplingConfig, truncate: bool = False) -> TaskAnswer:
        return await self._generated(request, self.lm.translate, text, sampling, source=source, target=target,
                                     truncate=truncate)

    async def answer(self, request: Request, question: str, context: str, sampling: SamplingConfig,
                     truncate: bool = False) -> TaskAnswer:
        prompt_tokens = len(self.lm.tokenizer.encode(question)) + len(self.lm.tokenizer.encode(context))
        set_usage(request, prompt_tokens=prompt_tokens, prompt=f"{question}\n{context}")
        options = {"temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens} \
            if self.lm.adapter.generates_answers else {}  # an extractive model takes a span, no sampling
        found = await self._call(self.lm.answer, question, context, truncate=truncate, **options)
        span = (found.start, found.end) if found.start is not None else None
        return TaskAnswer(found.text, "stop", prompt_tokens, len(self.lm.tokenizer.encode(found.text)),
                          found.score, span)

    async def classify(self, request: Request, text: str, labels: list[str]) -> list[float]:
        set_usage(request, prompt=text, prompt_tokens=len(self.lm.tokenizer.encode(text)))
        result = await self._call(self.lm.classify, text, labels=labels)
        return [math.log(max(result.scores[label], 1e-30)) for label in labels]


# ------------------------------------------------------------------------------------------
# Request bodies
# ------------------------------------------------------------------------------------------
class _TaskSampling(SamplingFields):
    """Sampling fields of the generative tasks: greedy unless asked otherwise, no streaming."""

    temperature: float | None = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(64, ge=1)
    truncate: bool = False  # a document too long for the context loses its start instead of a 400

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("task endpoints answer in one JSON body; stream with /v1/completions")
        return value

    @field_validator("n")
    @classmethod
    def _one_answer(cls, value: int) -> int:
        if value != 1:
            raise ValueError("task endpoints give one answer (n must be 1)")
        return value


class GenerateRequest(_TaskSampling):
    prompt: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)


class SummarizeRequest(_TaskSampling):
    text: str = Field(min_length=1)


class TranslateRequest(_TaskSampling):
    text: str = Field(min_length=1)
    target_language: str = Field(min_length=1, max_length=100)
    source_language: str | None = Field(None, min_length=1, max_length=100)


class AnswerRequest(_TaskSampling):
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)
    max_tokens: int = Field(32, ge=1)


class ClassifyRequest(RequestBody):
    model: str | None = None
    text: str = Field(min_length=1)
    labels: list[str] | None = Field(None, min_length=1, max_length=100)  # a classifier's own labels when absent

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        if any(not label.strip() for label in labels):
            raise ValueError("labels must be non-empty text")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels


# ------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------
router = APIRouter(dependencies=[Depends(authorize)])


def _tasks(request: Request, model: str | None, max_tokens: int | None = None) -> TaskModel:
    """The server's task model for a task request (404 for another model, 503 while loading, 400 for a
    ``max_tokens`` beyond the context)."""
    server = server_of(request)
    server.check_model(model)
    lm, _ = server.ready()
    check_max_tokens(max_tokens, lm.context_length)
    return server.tasks


def _answer(request: Request, field: str, answer: TaskAnswer) -> dict[str, Any]:
    body = {field: answer.text, "finish_reason": answer.finish_reason, "model": server_of(request).name,
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens}}
    if answer.score is not None:
        body["score"] = answer.score
    if answer.span is not None:
        body["start"], body["end"] = answer.span
    return body


def _truncation(body: _TaskSampling) -> dict[str, bool]:
    """``truncate=True`` for the task model when the body asks for it (a task model need not take it)."""
    return {"truncate": True} if body.truncate else {}


@router.post("/v1/generate")
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    """Plain continuation of ``prompt``: sampling as in /v1/completions (temperature 1 unless given)."""
    server = server_of(request)
    server.check_model(body.model)
    lm, engine = server.ready()
    check_max_tokens(body.max_tokens, lm.context_length)
    sampling = sampling_options(body, body.max_tokens)
    tasks = PromptTasks(lm, engine) if lm.adapter.engine_decodes else CheckpointTasks(lm, engine)
    answer = await tasks.generate(request, body.prompt, sampling, **_truncation(body))
    return _answer(request, "text", answer)


@router.post("/v1/summarize")
async def summarize(body: SummarizeRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model, body.max_tokens)
    sampling = sampling_options(body, body.max_tokens)
    return _answer(request, "summary", await tasks.summarize(request, body.text, sampling, **_truncation(body)))


@router.post("/v1/translate")
async def translate(body: TranslateRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model, body.max_tokens)
    answer = await tasks.translate(request, body.text, body.source_language, body.target_language,
                                   sampling_options(body, body.max_tokens), **_truncation(body))
    return _answer(request, "translation", answer)


@router.post("/v1/answer")
async def answer(body: AnswerRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model, body.max_tokens)
    sampling = sampling_options(body, body.max_tokens)
    if body.stop is None:  # an answer ends at the end of its line, as LanguageModel.answer's does
        sampling = dataclasses.replace(sampling, stop=list(ANSWER_DEFAULTS["stop"]))
    return _answer(request, "answer", await tasks.answer(request, body.question, body.context, sampling,
                                                         **_truncation(body)))


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model)
    own_labels, multi_label, thresholds = label_policy(tasks)
    labels = body.labels or own_labels
    if not labels:
        raise APIError(400, "labels are required: this model scores candidate labels you give", param="labels")
    logprobs = await tasks.classify(request, body.text, labels)
    if multi_label:  # independent labels: each its own probability
        probabilities = [math.exp(lp) for lp in logprobs]
    else:
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        probabilities = [w / sum(weights) for w in weights]
    scores = [{"label": label, "logprob": lp, "probability": p}
              for label, lp, p in zip(labels, logprobs, probabilities)]
    best = max(range(len(scores)), key=lambda i: logprobs[i])
    reply = {"label": labels[best], "scores": scores, "model": server_of(request).name}
    if multi_label:
        reply["labels"] = [x for x, p in zip(labels, probabilities) if p >= thresholds.get(x, 0.5)]
    return reply

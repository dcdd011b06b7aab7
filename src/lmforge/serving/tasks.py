"""Task endpoints: ``POST /v1/generate``, ``/v1/summarize``, ``/v1/translate``, ``/v1/classify``,
``/v1/answer``: JSON in, JSON out, each a thin layer over a :class:`TaskModel`.

:class:`PromptTasks` serves every task with the loaded decoder: prompt templates for the generative
tasks (decoded by the server's engine, so they share its batches, limits and metrics) and label
likelihood scoring (:func:`lmforge.evaluation.harness.label_scores`) for classification. A
task-specialised model (an encoder classifier, an encoder-decoder translator) plugs in by
implementing :class:`TaskModel` and being set as the server's ``tasks``.
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

from lmforge.api import SUMMARIZE_TEMPLATE, TRANSLATE_TEMPLATE, LanguageModel
from lmforge.config import SamplingConfig
from lmforge.errors import LmforgeError
from lmforge.evaluation.harness import CLASSIFICATION_TEMPLATE, QA_TEMPLATE, label_scores
from lmforge.inference.engine import Engine
from lmforge.serving.errors import APIError
from lmforge.serving.generation import Generation, encode_prompt, sampling_options
from lmforge.serving.schemas import RequestBody, SamplingFields
from lmforge.serving.state import authorize, engine_decodes, server_of, set_usage

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
    """What the task endpoints need. ``request`` is the HTTP request (for accounting and timeouts)."""

    async def summarize(self, request: Request, text: str, sampling: SamplingConfig) -> TaskAnswer: ...

    async def translate(self, request: Request, text: str, source: str | None, target: str,
                        sampling: SamplingConfig) -> TaskAnswer: ...

    async def answer(self, request: Request, question: str, context: str, sampling: SamplingConfig) -> TaskAnswer: ...

    async def classify(self, request: Request, text: str, labels: list[str]) -> list[float]:
        """Log-likelihood (nats) of each label for ``text``."""
        ...


class PromptTasks:
    """Every task from a decoder language model: templates, then generation by the server's engine.

    With a tokenizer that has a chat template, the filled template is sent as a user message.
    """

    def __init__(self, lm: LanguageModel, engine: Engine):
        self.lm, self.engine = lm, engine

    async def complete(self, request: Request, prompt: str, sampling: SamplingConfig, param: str = "prompt",
                       chat: bool = False) -> TaskAnswer:
        """Generate after ``prompt`` (or, with ``chat``, after a user message holding it)."""
        if chat and self.lm.tokenizer.chat_template is not None:
            ids = self.lm.chat_prompt([{"role": "user", "content": prompt}])
            if len(ids) >= self.lm.context_length:
                raise APIError(400, f"the {param} makes a prompt of {len(ids)} tokens but the model's context is "
                                    f"{self.lm.context_length} tokens; shorten it", param=param,
                               code="context_length_exceeded")
        else:
            ids = encode_prompt(self.lm, prompt, param)
        set_usage(request, prompt_tokens=len(ids), prompt=prompt)
        result = (await Generation(server_of(request), request, self.engine, [ids], sampling).results())[0]
        finish = "length" if result.finish_reason == "length" else "stop"
        return TaskAnswer(result.text.strip(), finish, len(ids), result.completion_tokens)

    async def summarize(self, request: Request, text: str, sampling: SamplingConfig) -> TaskAnswer:
        return await self.complete(request, SUMMARIZE_TEMPLATE.format(text=text), sampling, "text", chat=True)

    async def translate(self, request: Request, text: str, source: str | None, target: str,
                        sampling: SamplingConfig) -> TaskAnswer:
        prompt = TRANSLATE_TEMPLATE.format(text=text, source=source or "the source language", target=target)
        return await self.complete(request, prompt, sampling, "text", chat=True)

    async def answer(self, request: Request, question: str, context: str, sampling: SamplingConfig) -> TaskAnswer:
        prompt = QA_TEMPLATE.format(context=context, question=question)
        return await self.complete(request, prompt, sampling, "context", chat=True)

    async def classify(self, request: Request, text: str, labels: list[str]) -> list[float]:
        set_usage(request, prompt=text, prompt_tokens=len(self.lm.tokenizer.encode(text)))
        score = functools.partial(label_scores, self.lm, [text], labels, CLASSIFICATION_TEMPLATE)
        try:  # forward passes of their own, run by the engine's thread between two decoding steps
            scores = await asyncio.wrap_future(self.engine.call(score))
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
        classifier = lm.kind == "classification"
        self.labels: list[str] | None = list(lm.task["labels"]) if classifier else None
        self.multi_label = classifier and bool(lm.task.get("multi_label"))
        thresholds = lm.task.get("thresholds") if classifier else None
        self.thresholds = dict(zip(self.labels, thresholds)) if self.multi_label and thresholds else {}

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.wrap_future(self.engine.call(functools.partial(method, *args, **kwargs)))
        except LmforgeError as exc:
            raise APIError(400, str(exc)) from None

    async def _generated(self, request: Request, method: Any, text: str, sampling: SamplingConfig,
                         **kwargs: Any) -> TaskAnswer:
        prompt_tokens = len(self.lm.tokenizer.encode(text))
        set_usage(request, prompt_tokens=prompt_tokens, prompt=text)
        options = {k: v for k, v in dataclasses.asdict(sampling).items() if k not in ("num_samples", "stop") or v}
        output = await self._call(method, text, **kwargs, **options)
        tokens = len(self.lm.tokenizer.encode(output))
        set_usage(request, completion_tokens=tokens)
        return TaskAnswer(output, "length" if tokens >= sampling.max_new_tokens else "stop", prompt_tokens, tokens)

    async def generate(self, request: Request, prompt: str, sampling: SamplingConfig) -> TaskAnswer:
        return await self._generated(request, self.lm.generate, prompt, sampling)

    async def summarize(self, request: Request, text: str, sampling: SamplingConfig) -> TaskAnswer:
        return await self._generated(request, self.lm.summarize, text, sampling)

    async def translate(self, request: Request, text: str, source: str | None, target: str,
                        sampling: SamplingConfig) -> TaskAnswer:
        return await self._generated(request, self.lm.translate, text, sampling, source=source, target=target)

    async def answer(self, request: Request, question: str, context: str, sampling: SamplingConfig) -> TaskAnswer:
        prompt_tokens = len(self.lm.tokenizer.encode(question)) + len(self.lm.tokenizer.encode(context))
        set_usage(request, prompt_tokens=prompt_tokens, prompt=f"{question}\n{context}")
        if self.lm.kind == "qa":  # extractive: a span of the context, no sampling
            found = await self._call(self.lm.answer, question, context)
        else:
            options = {"temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens}
            found = await self._call(self.lm.answer, question, context, **options)
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

    temperature: float | None = Field(0.0, ge=0.0)
    max_tokens: int = Field(64, ge=1)

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
    temperature: float | None = Field(None, ge=0.0)


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


def _tasks(request: Request, model: str | None) -> TaskModel:
    server = server_of(request)
    server.check_model(model)
    server.ready()
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


@router.post("/v1/generate")
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    """Plain continuation of ``prompt``: sampling as in /v1/completions (temperature 1 unless given)."""
    server = server_of(request)
    server.check_model(body.model)
    lm, engine = server.ready()
    sampling = sampling_options(body, body.max_tokens)
    if engine_decodes(lm):
        answer = await PromptTasks(lm, engine).complete(request, body.prompt, sampling)
    else:
        answer = await CheckpointTasks(lm, engine).generate(request, body.prompt, sampling)
    return _answer(request, "text", answer)


@router.post("/v1/summarize")
async def summarize(body: SummarizeRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model)
    return _answer(request, "summary", await tasks.summarize(request, body.text,
                                                             sampling_options(body, body.max_tokens)))


@router.post("/v1/translate")
async def translate(body: TranslateRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model)
    answer = await tasks.translate(request, body.text, body.source_language, body.target_language,
                                   sampling_options(body, body.max_tokens))
    return _answer(request, "translation", answer)


@router.post("/v1/answer")
async def answer(body: AnswerRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model)
    return _answer(request, "answer", await tasks.answer(request, body.question, body.context,
                                                         sampling_options(body, body.max_tokens)))


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    tasks = _tasks(request, body.model)
    labels = body.labels or getattr(tasks, "labels", None)
    if not labels:
        raise APIError(400, "labels are required: this model scores candidate labels you give", param="labels")
    logprobs = await tasks.classify(request, body.text, labels)
    if getattr(tasks, "multi_label", False):  # independent labels: each its own probability
        probabilities = [math.exp(lp) for lp in logprobs]
    else:
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        probabilities = [w / sum(weights) for w in weights]
    scores = [{"label": label, "logprob": lp, "probability": p}
              for label, lp, p in zip(labels, logprobs, probabilities)]
    best = max(range(len(scores)), key=lambda i: logprobs[i])
    reply = {"label": labels[best], "scores": scores, "model": server_of(request).name}
    if getattr(tasks, "multi_label", False):
        thresholds = getattr(tasks, "thresholds", {})
        reply["labels"] = [x for x, p in zip(labels, probabilities) if p >= thresholds.get(x, 0.5)]
    return reply

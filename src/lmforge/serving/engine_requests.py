"""From HTTP requests to engine requests and back: sampling options, prompt ids, submission, and
awaiting events.

Each engine request's events reach the event loop through the server's :class:`~.relay.EventRelay`, so
the loop never blocks and concurrency is not limited by a thread pool. Whoever awaits the events cancels
the engine requests when it is itself cancelled (the client went away) or runs past the server's request
timeout, which frees their batch slots at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator

from fastapi import Request

from lmforge.api import LanguageModel
from lmforge.config import SamplingConfig
from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine, RequestHandle, Result, TokenEvent
from lmforge.inference.prompts import encode_prompt, fit_prompt
from lmforge.serving.errors import APIError, check_max_tokens, from_lmforge_error
from lmforge.serving.relay import EventRelay
from lmforge.serving.schemas import SamplingFields
from lmforge.serving.state import ServerState, server_of, set_usage

__all__ = ["EngineRequests", "decoding_engine", "engine_prompt", "sampling_options"]

#: The task endpoints, by the :class:`LanguageModel` method each serves.
TASK_ROUTES = {"classify": "/v1/classify", "answer": "/v1/answer", "translate": "/v1/translate",
               "summarize": "/v1/summarize", "generate": "/v1/generate"}


def sampling_options(body: SamplingFields, max_tokens: int | None) -> SamplingConfig:
    """The engine's options for a request body (OpenAI's field names and defaults)."""
    options = {
        "max_new_tokens": 16 if max_tokens is None else max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k if body.top_k is not None and body.top_k > 0 else None,
        "min_p": body.min_p or None,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "stop": [body.stop] if isinstance(body.stop, str) else (body.stop or []),
        "seed": body.seed,
        "ignore_eos": body.ignore_eos,
    }
    try:
        return SamplingConfig.from_options(None, **options)
    except LmforgeError as exc:
        raise APIError(400, str(exc)) from None


def engine_prompt(lm: LanguageModel, ids: list[int], what: str = "prompt", param: str = "prompt",
                  truncate: bool = False, reserve: int = 0) -> list[int]:
    """Prompt ids as the engine takes them: they must leave room for one new token (the engine has no
    sliding window), else a 400 ``context_length_exceeded`` naming ``param``; with ``truncate`` they lose
    their start instead, leaving room for ``reserve`` new tokens (at most half the context)."""
    return fit_prompt(ids, lm.tokenizer, lm.context_length, room=1, truncate=truncate, reserve=reserve,
                      what=what, param=param, hint="; shorten it").ids


def encode_engine_prompt(lm: LanguageModel, prompt: str, param: str = "prompt", truncate: bool = False,
                         reserve: int = 0) -> list[int]:
    """:func:`engine_prompt` of a prompt text (:func:`~lmforge.inference.prompts.encode_prompt`)."""
    return engine_prompt(lm, encode_prompt(lm.tokenizer, prompt), param=param, truncate=truncate, reserve=reserve)


def task_routes(lm: LanguageModel) -> list[str]:
    """The task endpoints that serve what ``lm`` can do."""
    return [route for method, route in TASK_ROUTES.items() if method in lm.capabilities]


def decoding_engine(request: Request, body: SamplingFields) -> tuple[ServerState, LanguageModel, Engine]:
    """The server, its model and engine for a generation request: a 404 when ``body`` names another model,
    a 503 while the model loads, a 400 unless the engine can decode it (a decoder language model) or when
    ``max_tokens`` (or ``max_completion_tokens``) is beyond its context."""
    server = server_of(request)
    server.check_model(body.model)
    lm, engine = server.ready()
    if not lm.adapter.engine_decodes:
        raise APIError(400, f"this server's model cannot be served by the continuous-batching engine (it is a "
                            f"{lm.model.config.family} {lm.kind.replace('_', ' ')}); its endpoints: "
                            f"{', '.join(task_routes(lm))}", code="unsupported_model")
    for param in ("max_tokens", "max_completion_tokens"):
        check_max_tokens(getattr(body, param, None), lm.context_length, param)
    return server, lm, engine


class EngineRequests:
    """The engine requests of one HTTP request (each prompt ``n`` times, seeds ``seed + i``), awaited from
    the event loop. Creating it submits them, all or nothing: a refusal (full queue, bad options) cancels
    what was already submitted and raises as an :class:`APIError`.

    Iterate :meth:`events` for ``(index, event)`` pairs (index into ``handles``), or await :meth:`results`.
    Both account finished generations in the metrics and the request log, raise a 408 :class:`APIError`
    past the server's request timeout, and cancel unfinished handles when they end in any way.
    """

    def __init__(self, server: ServerState, request: Request, engine: Engine, prompts: list[list[int]],
                 sampling: SamplingConfig, n: int = 1, top_logprobs: int | None = None):
        self.server, self.request = server, request
        self.deadline = None if server.request_timeout is None else time.monotonic() + server.request_timeout
        self._queue: asyncio.Queue = asyncio.Queue()
        relay = server.relay
        self.handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                for i in range(n):
                    seed = None if sampling.seed is None else sampling.seed + i
                    options = dataclasses.replace(sampling, seed=seed, stop=list(sampling.stop))
                    listener = functools.partial(self._deliver, relay, len(self.handles))
                    self.handles.append(engine.submit(ids, options, top_logprobs=top_logprobs, listener=listener))
        except BaseException as exc:
            self.cancel()
            if isinstance(exc, LmforgeError):
                raise from_lmforge_error(exc) from None
            raise

    def _deliver(self, relay: EventRelay, index: int, event: object) -> None:
        """Called by the engine's thread for every event: send it to the loop, but for token events
        without log-probabilities (text events carry the text; the server has no use for bare ids)."""
        if type(event) is TokenEvent and event.logprob is None:
            return
        relay.push(self._queue, (index, event))

    def backlog(self) -> int:
        """Events delivered but not yet taken (a streamer writes once this is 0)."""
        return self._queue.qsize()

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | object]]:
        """Every handle's events until each has its :class:`Result` (which is yielded too)."""
        finished = 0
        try:
            while finished < len(self.handles):
                timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                try:
                    index, event = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
                    set_usage(self.request, outcome="timeout")
                    raise APIError(408, f"the request took longer than the server's limit of "
                                        f"{self.server.request_timeout:g} s", code="request_timeout") from None
                if isinstance(event, BaseException):
                    raise _engine_failure(event)
                if isinstance(event, Result):
                    finished += 1
                    self.server.metrics.observe(event)
                    set_usage(self.request, completion_tokens=event.completion_tokens,
                              time_to_first_token=event.time_to_first_token)
                    if event.finish_reason == "cancelled":
                        set_usage(self.request, outcome="cancelled")
                yield index, event
        except asyncio.CancelledError:
            set_usage(self.request, outcome="cancelled")
            raise
        finally:
            self.cancel()

    async def results(self) -> list[Result]:
        """Every handle's :class:`Result`, in submission order."""
        results: dict[int, Result] = {}
        async for index, event in self.events():
            if isinstance(event, Result):
                results[index] = event
        return [results[i] for i in range(len(self.handles))]

    def cancel(self) -> None:
        """Free the batch slots of unfinished requests."""
        for handle in self.handles:
            if not handle.done:
                handle.cancel()


def _engine_failure(exc: BaseException) -> APIError:
    if isinstance(exc, LmforgeError):
        return from_lmforge_error(exc)
    return APIError(500, f"generation failed: {type(exc).__name__}", "internal_error")

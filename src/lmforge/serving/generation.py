"""From HTTP requests to engine requests and back: sampling options, submission, and awaiting events.

Each engine request's events are carried to the event loop by a small reader thread per request
(``RequestHandle.next_event`` blocks), so the loop never blocks and concurrency is not limited by a
thread pool. Whoever awaits the events cancels the engine requests when it is itself cancelled (the
client went away) or runs past the server's request timeout, which frees their batch slots at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from fastapi import Request

from lmforge.api import LanguageModel, sampling_config
from lmforge.config import SamplingConfig
from lmforge.errors import LmforgeError, RequestError
from lmforge.inference.engine import Engine, RequestHandle, Result, TokenEvent
from lmforge.serving.errors import APIError, from_lmforge_error
from lmforge.serving.schemas import SamplingFields
from lmforge.serving.state import ServerState, set_usage

__all__ = ["EventRelay", "Generation", "encode_prompt", "sampling_options"]


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
        return sampling_config(options)
    except LmforgeError as exc:
        raise APIError(400, str(exc)) from None


def encode_prompt(lm: LanguageModel, prompt: str, param: str = "prompt") -> list[int]:
    """Token ids of a prompt, or a 400 when it leaves no room in the context for a new token."""
    try:
        ids, _ = lm.encode_prompt(prompt)
        size = len(ids)
    except RequestError:  # longer than the context (so not empty: no start-of-document token unless bos)
        ids, size = [], len(lm.tokenizer.encode(prompt)) + (1 if lm.tokenizer.adds_bos else 0)
    if size >= lm.context_length:
        raise APIError(400, f"the {param} is {size} tokens long but the model's context is {lm.context_length} "
                            "tokens, with room needed for at least one new token; shorten it",
                       param=param, code="context_length_exceeded")
    return ids


class EventRelay:
    """Carries events from the engine's thread to asyncio queues on one loop, in order, waking the loop
    once per burst: the first event of a burst schedules a drain, later ones join it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue, object]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, queue: asyncio.Queue, item: object) -> None:
        """Any thread: deliver ``item`` to ``queue`` soon (raises RuntimeError once the loop is closed)."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, deque(), False
        for queue, item in items:
            queue.put_nowait(item)


class Generation:
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

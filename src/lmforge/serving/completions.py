"""OpenAI's ``POST /v1/completions`` and ``POST /v1/chat/completions``: JSON answers, or Server-Sent
Events with ``stream`` (OpenAI's chunk shapes, ``stream_options.include_usage``, ``data: [DONE]``), and
``logprobs`` in each route's own format."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lmforge.inference.engine import Result, TextEvent, TokenEvent, TokenLogprob
from lmforge.serving.engine_requests import (
    EngineRequests,
    decoding_engine,
    encode_engine_prompt,
    engine_prompt,
    sampling_options,
)
from lmforge.serving.errors import APIError
from lmforge.serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from lmforge.serving.state import authorize, set_usage
from lmforge.tokenizer import Tokenizer

__all__ = ["router"]

router = APIRouter(dependencies=[Depends(authorize)])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    server, lm, engine = decoding_engine(request, body)
    if body.echo or body.suffix:
        raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
    sampling = sampling_options(body, body.max_tokens)
    encoded = [encode_engine_prompt(lm, p) for p in prompts]
    set_usage(request, prompt_tokens=sum(map(len, encoded)), prompt="\n".join(prompts))
    generation = EngineRequests(server, request, engine, encoded, sampling, body.n, body.logprobs)
    reply = _Reply("completion", server.name, sum(map(len, encoded)), lm.tokenizer,
                   [len(prompts[i // body.n]) for i in range(len(generation.handles))])
    return await reply.send(generation, body)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    server, lm, engine = decoding_engine(request, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    try:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    ids = engine_prompt(lm, lm.chat_prompt(messages), what="conversation", param="messages")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = sampling_options(body, lm.context_length if limit is None else limit)
    set_usage(request, prompt_tokens=len(ids), prompt=json.dumps(messages, ensure_ascii=False))
    generation = EngineRequests(server, request, engine, [ids], sampling, body.n,
                                (body.top_logprobs or 0) if body.logprobs else None)
    reply = _Reply("chat", server.name, len(ids), lm.tokenizer, [0] * len(generation.handles))
    return await reply.send(generation, body)


class _Reply:
    """Formats one request's generations as OpenAI's completion or chat completion objects."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, tokenizer: Tokenizer, text_starts: list[int]):
        self.kind, self.model, self.prompt_tokens, self.tokenizer = kind, model, prompt_tokens, tokenizer
        self.text_starts = text_starts  # per choice: where the completion starts in the prompt + completion text
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "text_completion" if kind == "completion" else "chat.completion"

    async def send(self, generation: EngineRequests, body: SamplingFields) -> Any:
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(generation, include_usage, body.n), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await generation.results()
        completion_tokens = sum(r.completion_tokens for r in results)
        choices = [self._choice(i, r) for i, r in enumerate(results)]
        cached = sum(r.cached_tokens for r in results[::body.n])
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(completion_tokens, cached)}

    def _usage(self, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
        """OpenAI's usage object; ``cached_tokens``: prompt tokens taken from the prefix cache (counted for
        each prompt's first choice, as its prompt is counted once)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    def _choice(self, index: int, result: Result) -> dict[str, Any]:
        logprobs = None if result.logprobs is None else self._logprobs(index, result.logprobs, 0)
        if self.kind == "completion":
            return {"index": index, "text": result.text, "logprobs": logprobs, "finish_reason": _finish(result)}
        return {"index": index, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs,
                "finish_reason": _finish(result)}

    def _logprobs(self, index: int, tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """``tokens`` in the route's format; ``offset``: characters of this choice's completion already sent."""
        text = self.tokenizer.token_bytes
        if self.kind == "chat":
            def entry(token_id: int, logprob: float) -> dict[str, Any]:
                raw = text(token_id)
                return {"token": _token_string(raw), "logprob": logprob, "bytes": list(raw)}

            return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                                for t in tokens], "refusal": None}
        strings = [_token_string(text(t.token_id)) for t in tokens]
        offsets, position = [], self.text_starts[index] + offset
        for string in strings:
            offsets.append(position)
            position += len(string)
        return {"tokens": strings, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{_token_string(text(i)): lp for i, lp in t.top} for t in tokens],
                "text_offset": offsets}

    def _chunk(self, index: int, text: str | None, finish: str | None, logprobs: Any = None,
               role: bool = False, usage: bool = False) -> dict[str, Any]:
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": index, "text": text or "", "logprobs": logprobs,
                                      "finish_reason": finish}
        else:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                **({"usage": None} if usage else {})}

    async def _stream(self, generation: EngineRequests, include_usage: bool, n: int) -> AsyncIterator[str]:
        """Text (or chat deltas) as it becomes final, with the log-probabilities of the tokens behind it; a
        last chunk per choice with its ``finish_reason``; with ``include_usage`` a final chunk with empty
        choices and the usage; then ``[DONE]``. An error after the stream began is an error event."""
        count = len(generation.handles)
        pending: list[list[TokenLogprob]] = [[] for _ in range(count)]
        sent_chars = [0] * count
        completion_tokens = cached_tokens = 0

        def logprobs(index: int) -> Any:
            if not pending[index]:
                return None
            formatted = self._logprobs(index, pending[index], sent_chars[index])
            pending[index] = []
            return formatted

        try:
            if self.kind == "chat":
                for index in range(count):
                    yield _sse(self._chunk(index, "", None, role=True, usage=include_usage))
            written: list[str] = []  # chunks of the events at hand, sent in one write
            async for index, event in generation.events():
                if isinstance(event, TokenEvent) and event.logprob is not None:
                    pending[index].append(event.logprob)
                elif isinstance(event, TextEvent):
                    written.append(_sse(self._chunk(index, event.text, None, logprobs(index), usage=include_usage)))
                    sent_chars[index] += len(event.text)
                elif isinstance(event, Result):
                    completion_tokens += event.completion_tokens
                    if index % n == 0:  # each prompt's first choice
                        cached_tokens += event.cached_tokens
                    written.append(_sse(self._chunk(index, None if self.kind == "chat" else "", _finish(event),
                                                    logprobs(index), usage=include_usage)))
                if written and not generation.backlog():
                    yield "".join(written)
                    written.clear()
            if written:
                yield "".join(written)
            if include_usage:
                yield _sse({"id": self.id, "object": "text_completion" if self.kind == "completion"
                            else "chat.completion.chunk", "created": self.created, "model": self.model,
                            "choices": [], "usage": self._usage(completion_tokens, cached_tokens)})
        except APIError as error:
            set_usage(generation.request, error=error.message)
            yield _sse(error.body())
        finally:  # also when the client went away (the generator is closed): free the slots at once
            generation.cancel()
        yield _sse("[DONE]")


def _finish(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _token_string(raw: bytes) -> str:
    """A token's text, or OpenAI's ``bytes:\\xNN`` form for a token that holds part of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"

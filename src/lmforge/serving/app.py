"""The OpenAI-compatible HTTP server: a FastAPI app around one continuous-batching :class:`Engine`.

>>> from lmforge import LanguageModel
>>> from lmforge.serving import create_app
>>> app = create_app(LanguageModel.load("runs/quickstart"), api_key="secret")
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both with Server-Sent Events when ``stream`` is true), ``POST /tokenize``, ``POST /detokenize``.
Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.

Each request's engine events are carried to the event loop by a small reader thread per engine
request (``handle`` iteration blocks), so the loop never blocks and concurrency is not limited by a
thread pool. A client that goes away (the response task is cancelled) cancels its engine requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.api import LanguageModel, sampling_config
from lmforge.config import SamplingConfig
from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine, RequestHandle, Result, TextEvent
from lmforge.serving.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Sampling,
    error_body,
)

__all__ = ["APIError", "create_app"]


class APIError(Exception):
    """An error answered as OpenAI's JSON error body with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error", 503: "service_unavailable"}


def create_app(lm: LanguageModel, *, api_key: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
               model_name: str | None = None) -> FastAPI:
    """A FastAPI app serving ``lm``; its :class:`Engine` starts with the app (lifespan) and stops with it.

    Args:
        lm: the loaded model.
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (``/health`` stays open).
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting for a slot; more are refused with 429.
        model_name: the model id clients see (default: the checkpoint directory's name).
    """
    name = model_name or (lm.path.name if lm.path is not None else "lmforge")
    created = int(time.time())
    state: dict[str, Any] = {"engine": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(lm.model, lm.tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
        engine.start()
        state["engine"] = app.state.engine = engine
        try:
            yield
        finally:
            state["engine"] = None
            engine.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.model_name = name

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                                f"{e.get('msg', 'invalid')}" for e in errors[:5])
        return APIError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), _STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(LmforgeError)
    async def _lmforge_error(request: Request, exc: LmforgeError) -> JSONResponse:
        return _to_api_error(exc).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}", "internal_error").response()

    # ------------------------------------------------------------------ helpers
    def engine() -> Engine:
        current = state["engine"]
        if current is None:
            raise APIError(503, "the model is not loaded yet", "service_unavailable")
        return current

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(body: _Sampling) -> None:
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}",
                           "not_found_error", param="model", code="model_not_found")

    def submit(prompts: list[list[int]], sampling: SamplingConfig, n: int) -> list[RequestHandle]:
        """Submit every prompt ``n`` times (seeds ``seed + i``); all or nothing."""
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                for i in range(n):
                    seed = None if sampling.seed is None else sampling.seed + i
                    options = dataclasses.replace(sampling, seed=seed, stop=list(sampling.stop))
                    handles.append(engine().submit(ids, options))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if state["engine"] is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "lmforge",
             "max_model_len": lm.context_length}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Any:
        check_model(body)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported yet", param="logprobs")
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        sampling = _sampling(body, body.max_tokens)
        encoded = [_encode(lm, p) for p in prompts]
        return await _respond(submit(encoded, sampling, body.n), body, name, "completion",
                              sum(len(ids) for ids in encoded))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        check_model(body)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported yet", param="logprobs")
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = lm.chat_prompt(messages)
        if len(ids) >= lm.context_length:
            raise APIError(400, f"the conversation is {len(ids)} tokens long but the model's context is "
                                f"{lm.context_length} tokens, with room needed for at least one new token",
                           param="messages", code="context_length_exceeded")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = _sampling(body, lm.context_length if limit is None else limit)
        return await _respond(submit([ids], sampling, body.n), body, name, "chat", len(ids))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, _: None = Depends(authorize)) -> dict[str, Any]:
        tokenizer = lm.tokenizer
        head = tokenizer.start_ids if body.add_special_tokens and (tokenizer.adds_bos or not body.prompt) else []
        tokens = head + (tokenizer.encode(body.prompt) if body.prompt else [])
        return {"tokens": tokens, "count": len(tokens), "max_model_len": lm.context_length}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, _: None = Depends(authorize)) -> dict[str, Any]:
        size = lm.tokenizer.vocab_size
        if not all(0 <= t < size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {size})", param="tokens")
        return {"prompt": lm.tokenizer.decode(body.tokens)}

    return app


# ------------------------------------------------------------------------------------------
# Requests -> engine
# ------------------------------------------------------------------------------------------
def _to_api_error(exc: LmforgeError) -> APIError:
    message = str(exc)
    if message.startswith("the queue is full"):
        return APIError(429, message, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    code = "context_length_exceeded" if "context" in message and "tokens" in message else None
    return APIError(400, message, code=code)


def _encode(lm: LanguageModel, prompt: str) -> list[int]:
    ids, _ = lm.encode_prompt(prompt)
    if len(ids) >= lm.context_length:
        raise APIError(400, f"the prompt is {len(ids)} tokens long but the model's context is {lm.context_length} "
                            "tokens, with room needed for at least one new token; shorten it",
                       param="prompt", code="context_length_exceeded")
    return ids


def _sampling(body: _Sampling, max_tokens: int | None) -> SamplingConfig:
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported yet; use repetition_penalty", param=field)
    options = {
        "max_new_tokens": 16 if max_tokens is None else max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k if body.top_k is not None and body.top_k > 0 else None,
        "min_p": body.min_p or None,
        "repetition_penalty": body.repetition_penalty,
        "stop": [body.stop] if isinstance(body.stop, str) else (body.stop or []),
        "seed": body.seed,
    }
    try:
        return sampling_config(options)
    except LmforgeError as exc:
        raise APIError(400, str(exc)) from None


def _pump(handles: list[RequestHandle], loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Carry every handle's events to an asyncio queue as ``(index, event)`` (one reader thread per handle)."""
    events: asyncio.Queue = asyncio.Queue()

    def read(index: int, handle: RequestHandle) -> None:
        while True:
            try:
                event = handle.next_event()
            except BaseException as exc:  # the engine failed this request
                event = exc
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the loop is gone
                handle.cancel()
                return
            if isinstance(event, (Result, BaseException)):
                return

    for index, handle in enumerate(handles):
        threading.Thread(target=read, args=(index, handle), name="lmforge-reader", daemon=True).start()
    return events


def _finish_reason(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


async def _respond(handles: list[RequestHandle], body: _Sampling, model: str, kind: str,
                   prompt_tokens: int) -> Any:
    """The JSON response (all handles awaited) or, with ``body.stream``, a Server-Sent Events stream."""
    events = _pump(handles, asyncio.get_running_loop())
    rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(handles, events, rid, created, model, kind, prompt_tokens, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results: dict[int, Result] = {}
    try:
        while len(results) < len(handles):
            index, event = await events.get()
            if isinstance(event, BaseException):
                raise _engine_failure(event)
            if isinstance(event, Result):
                results[index] = event
    finally:
        for handle in handles:  # a client that went away (cancelled task) frees its slots
            if not handle.done:
                handle.cancel()
    ordered = [results[i] for i in range(len(handles))]
    completion_tokens = sum(r.completion_tokens for r in ordered)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if kind == "completion":
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": _finish_reason(r)}
                   for i, r in enumerate(ordered)]
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": usage}
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                "finish_reason": _finish_reason(r)} for i, r in enumerate(ordered)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def _engine_failure(exc: BaseException) -> APIError:
    if isinstance(exc, LmforgeError):
        return _to_api_error(exc)
    return APIError(500, f"generation failed: {type(exc).__name__}", "internal_error")


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(handles: list[RequestHandle], events: asyncio.Queue, rid: str, created: int, model: str,
                  kind: str, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk format: text (or chat deltas) as it becomes final, a last chunk per choice with its
    ``finish_reason``, with ``include_usage`` a final chunk with empty choices and the usage, then [DONE]."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, content: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if kind == "completion":
            choice: dict[str, Any] = {"index": index, "text": content or "", "logprobs": None,
                                      "finish_reason": finish}
        else:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra}

    completion_tokens, finished = 0, 0
    try:
        if kind == "chat":
            for index in range(len(handles)):
                yield _sse(chunk(index, "", None, role=True))
        while finished < len(handles):
            index, event = await events.get()
            if isinstance(event, BaseException):
                error = _engine_failure(event)
                yield _sse(error_body(error.message, error.type, error.param, error.code))
                break
            if isinstance(event, TextEvent):
                yield _sse(chunk(index, event.text, None))
            elif isinstance(event, Result):
                finished += 1
                completion_tokens += event.completion_tokens
                yield _sse(chunk(index, None if kind == "chat" else "", _finish_reason(event)))
        else:
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens}})
        yield _sse("[DONE]")
    finally:  # the client went away (the generator is closed or cancelled): free the slots at once
        for handle in handles:
            if not handle.done:
                handle.cancel()

"""The HTTP server: a FastAPI app around one continuous-batching :class:`~lmforge.inference.engine.Engine`.

>>> from lmforge import LanguageModel
>>> from lmforge.serving import create_app
>>> app = create_app(LanguageModel.load("runs/quickstart"), api_key="secret")
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /`` (the web page), ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI's, streamed as Server-Sent Events
with ``stream``), the task endpoints ``POST /v1/generate``, ``/v1/summarize``, ``/v1/translate``,
``/v1/classify``, ``/v1/answer``, and ``POST /tokenize``, ``POST /detokenize``. Every error is
OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for client
mistakes; nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.api import LanguageModel
from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine
from lmforge.inference.prompts import encode_prompt
from lmforge.serving import completions, task_routes
from lmforge.serving.errors import APIError, from_lmforge_error
from lmforge.serving.metrics import CONTENT_TYPE_LATEST
from lmforge.serving.middleware import ServingMiddleware
from lmforge.serving.relay import EventRelay
from lmforge.serving.schemas import DetokenizeRequest, TokenizeRequest
from lmforge.serving.state import ServerState, authorize, server_of

if TYPE_CHECKING:
    from lmforge.serving.request_log import RequestLog

__all__ = ["APIError", "create_app"]

logger = logging.getLogger(__name__)

# The page's own inline script and style only; it talks to this origin only.
_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                "img-src 'self' data:; base-uri 'none'; form-action 'none'")


def create_app(model: LanguageModel | Callable[[], LanguageModel], *, api_key: str | None = None,
               max_batch_size: int = 8, max_queue: int = 64, prefix_cache_tokens: int | None = None,
               model_name: str | None = None,
               request_timeout: float | None = None, max_body_bytes: int = 1 << 20,
               request_log: RequestLog | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """A FastAPI app serving a model; its engine starts with the app (lifespan) and stops with it.

    Args:
        model: a loaded model, or a function loading one: it then runs in a background thread once the
            app has started, and until it returns ``/health`` answers 503 and the model routes 503 too.
        api_key: when set, every route but ``/``, ``/health`` and ``/metrics`` needs
            ``Authorization: Bearer <api_key>``.
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting for a slot; more are refused with 429.
        prefix_cache_tokens: most prompt positions kept for prefix caching (0: none; None: the engine's
            default, see :class:`~lmforge.inference.engine.Engine`).
        model_name: the model id clients see (default: the checkpoint directory's name).
        request_timeout: seconds a generation may take before it is stopped with a 408 (None: no limit).
        max_body_bytes: larger request bodies are refused with 413.
        request_log: where every request is recorded; the app closes it when it shuts down.
        on_load_error: called with the exception when loading ``model`` fails.
    """
    if model_name is None:
        path = model.path if isinstance(model, LanguageModel) else None
        model_name = path.name if path is not None else "lmforge"
    server = ServerState(name=model_name, api_key=api_key, request_timeout=request_timeout,
                         max_body_bytes=max_body_bytes, request_log=request_log, created=int(time.time()))

    def make_engine(lm: LanguageModel) -> Engine:
        return Engine(lm.model, lm.tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                      prefix_cache_tokens=prefix_cache_tokens)

    def publish(lm: LanguageModel, engine: Engine) -> None:
        server.metrics.watch(engine)
        task_model = task_routes.PromptTasks if lm.adapter.engine_decodes else task_routes.CheckpointTasks
        server.lm, server.engine, server.tasks = lm, engine, task_model(lm, engine)

    def load_and_serve(loop: asyncio.AbstractEventLoop) -> None:
        """The engine's thread: load the model, then run the engine's loop here, so that one thread does
        all the computing (see :meth:`Engine.call`)."""
        try:
            lm = model()
            engine = make_engine(lm)
        except Exception as exc:
            server.load_error = str(exc)
            logger.error("the model could not be loaded: %s", exc)
            if on_load_error is not None:
                loop.call_soon_threadsafe(on_load_error, exc)
            return
        try:
            loop.call_soon_threadsafe(publish, lm, engine)
        except RuntimeError:  # the app already shut down
            return
        logger.info("model %s loaded; serving", server.name)
        engine.run()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        server.relay = EventRelay(loop)
        if isinstance(model, LanguageModel):
            engine = make_engine(model)
            engine.start()
            publish(model, engine)
        else:
            threading.Thread(target=load_and_serve, args=(loop,), name="lmforge-engine", daemon=True).start()
        try:
            yield
        finally:
            if server.engine is not None:
                server.engine.stop()
            server.engine = server.tasks = None
            if server.request_log is not None:
                server.request_log.close()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.server = server
    _add_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(task_routes.router)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("lmforge").joinpath("serving", "static", "index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY})

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.engine is None:
            status = "failed" if server.load_error else "loading"
            return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        lm, _ = server.ready()
        return {"object": "list", "data": [
            {"id": server.name, "object": "model", "created": server.created, "owned_by": "lmforge",
             "max_model_len": lm.context_length}]}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        lm, _ = server_of(request).ready()
        tokenizer = lm.tokenizer
        try:  # the prompt's ids as /v1/completions reads them, or (without special tokens) the bare text's
            tokens = encode_prompt(tokenizer, body.prompt) if body.add_special_tokens else \
                (tokenizer.encode(body.prompt) if body.prompt else [])
        except LmforgeError as exc:  # text the tokenizer cannot encode (also refused by TokenizeRequest)
            raise APIError(400, str(exc), param="prompt") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": lm.context_length}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        lm, _ = server_of(request).ready()
        size = lm.tokenizer.vocab_size
        if not all(0 <= t < size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {size})", param="tokens")
        return {"prompt": lm.tokenizer.decode(body.tokens)}

    app.add_middleware(ServingMiddleware, server=server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON body: validation errors are 400s, library errors 4xx, the rest 500."""
    # The names pydantic gives the members of a union in an error's location (``prompt.str``,
    # ``stop.list[str]``): not fields, so left out of the ``param`` an error names.
    union_tags = {"str", "int", "float", "bool", "none", "bytes", "list", "dict", "tuple", "set"}

    def field_path(error: dict[str, Any]) -> str:
        """The dotted path of the field a validation error is about (``messages.0.content``)."""
        parts = [str(part) for part in error.get("loc", ()) if part != "body"]
        for i, part in enumerate(parts):
            if part in union_tags or "[" in part or part.startswith(("function-", "constrained-")):
                parts = parts[:i]
                break
        return ".".join(parts)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif isinstance((first.get("ctx") or {}).get("param"), str):  # a body-wide check naming its field
            message, param = str(first.get("msg", "invalid")), first["ctx"]["param"]
        else:
            param = field_path(first) or None
            lines = dict.fromkeys(f"{field_path(e) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5])
            message = "; ".join(lines)
        return APIError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(LmforgeError)
    async def lmforge_error(request: Request, exc: LmforgeError) -> JSONResponse:
        return from_lmforge_error(exc).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return APIError(500, f"internal error: {type(exc).__name__}", "internal_error").response()

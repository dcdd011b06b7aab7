"""What every route of one server shares: the model (once loaded), its engine, the name clients see,
limits, metrics and the request log. Routes reach it as ``request.app.state.server``."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from lmforge.serving.errors import APIError
from lmforge.serving.metrics import ServerMetrics
from lmforge.serving.relay import EventRelay

if TYPE_CHECKING:  # lower layers, for annotations only
    from lmforge.api import LanguageModel
    from lmforge.inference.engine import Engine

__all__ = ["ServerState", "authorize", "server_of", "set_usage"]


@dataclass
class ServerState:
    """The server's shared state. ``lm``, ``engine`` and ``tasks`` are None until the model is loaded."""

    name: str
    api_key: str | None = None
    request_timeout: float | None = None   # seconds a generation may take; None: no limit
    max_body_bytes: int = 1 << 20
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    request_log: Any = None                 # a serving.request_log.RequestLog, or None: nothing recorded
    created: int = 0
    lm: LanguageModel | None = None
    engine: Engine | None = None
    tasks: Any = None                        # the serving.task_routes.TaskModel behind the task endpoints
    relay: EventRelay | None = None          # engine thread -> event loop; made when the app starts
    load_error: str | None = None

    def ready(self) -> tuple[LanguageModel, Engine]:
        """The model and its engine, or a 503 while the model is still loading (or failed to)."""
        if self.lm is None or self.engine is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, code="model_not_ready", headers={"Retry-After": "1"})
        return self.lm, self.engine

    def check_model(self, model: str | None) -> None:
        """A request naming another model is a 404 (OpenAI's answer)."""
        if model is not None and model != self.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")


def server_of(request: Request) -> ServerState:
    return request.app.state.server


async def authorize(request: Request) -> None:
    """With an API key set, require ``Authorization: Bearer <key>`` (compared in constant time)."""
    key = server_of(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def set_usage(request: Request, **fields: Any) -> None:
    """Note facts about this request for the request log (``prompt_tokens``, ``completion_tokens``,
    ``time_to_first_token``, ``prompt``, ``outcome``); read back by the middleware when it ends."""
    usage = request.scope.setdefault("lmforge", {})
    for key, value in fields.items():
        if key in ("prompt_tokens", "completion_tokens") and value is not None:
            usage[key] = usage.get(key, 0) + value
        elif key == "time_to_first_token":
            if usage.get(key) is None:
                usage[key] = value
        else:
            usage[key] = value

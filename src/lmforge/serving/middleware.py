"""The server's outermost ASGI layer: the request body size limit (413), and, when each response has
been sent to its end (streams included), its metrics and its request-log record."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serving.errors import APIError
from lmforge.serving.state import ServerState

__all__ = ["ServingMiddleware"]

logger = logging.getLogger(__name__)


class ServingMiddleware:
    """Wraps the app: limits request bodies to ``server.max_body_bytes`` and accounts every HTTP request.

    The metrics' endpoint label is the path of the route that answered ("other" for unknown paths, so
    that random paths cannot blow up the label set).
    """

    def __init__(self, app: ASGIApp, server: ServerState):
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_wall, started = time.time(), time.perf_counter()
        limit = self.server.max_body_bytes
        response: dict[str, Any] = {"status": None, "error": b""}
        too_large = f"the request body is larger than the limit of {limit} bytes"

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                response["received"] = response.get("received", 0) + len(message.get("body", b""))
                if response["received"] > limit:
                    raise HTTPException(413, too_large)
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body" and (response["status"] or 0) >= 400:
                response["error"] += message.get("body", b"")[:4096]
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await APIError(413, too_large).response()(scope, receive, watched_send)
            else:
                await self.app(scope, limited_receive, watched_send)
        finally:
            self._account(scope, response, started_wall, time.perf_counter() - started)

    def _account(self, scope: Scope, response: dict[str, Any], started: float, latency: float) -> None:
        notes: dict[str, Any] = scope.get("lmforge", {})
        status = response["status"]
        path = scope.get("path", "")
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        outcome = notes.get("outcome") or _outcome(status)
        self.server.metrics.record_request(endpoint, outcome, latency)
        log = self.server.request_log
        if log is None or endpoint in ("/health", "/metrics", "/"):
            return
        from lmforge.serving.request_log import RequestRecord  # only servers with a log need sqlite

        client = scope.get("client")
        try:
            log.record(RequestRecord(
                time=started, method=scope.get("method", ""), endpoint=path[:200], status=status or 499,
                outcome=outcome, latency=latency, prompt_tokens=notes.get("prompt_tokens"),
                completion_tokens=notes.get("completion_tokens"),
                time_to_first_token=notes.get("time_to_first_token"), model=self.server.name,
                error=notes.get("error") or _error_message(response["error"]), prompt=notes.get("prompt"),
                client=client[0] if client else None))
        except Exception:  # the log must never break serving
            logger.exception("could not record the request")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _outcome(status: int | None) -> str:
    if status is None:
        return "cancelled"  # the client went away before an answer started
    if status == 408:
        return "timeout"
    return "ok" if status < 400 else "client_error" if status < 500 else "server_error"


def _error_message(body: bytes) -> str | None:
    if not body:
        return None
    try:
        return str(json.loads(body)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")

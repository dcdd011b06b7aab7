"""HTTP errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from lmforge.errors import LmforgeError
from lmforge.serving.schemas import error_body

__all__ = ["STATUS_TYPES", "APIError", "check_max_tokens", "from_lmforge_error"]

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered as OpenAI's JSON error body with ``status``."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        # never a lone surrogate in the body (it could not be written as UTF-8): escaped as \udXXX
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_lmforge_error(exc: LmforgeError) -> APIError:
    """A library error raised by a request (bad options, full queue, too long a prompt) as a 4xx."""
    message = str(exc)
    if message.startswith("the queue is full"):
        return APIError(429, message, code="queue_full", headers={"Retry-After": "1"})
    return APIError(400, message, param=getattr(exc, "param", None), code=getattr(exc, "code", None))


def check_max_tokens(value: int | None, context_length: int, param: str = "max_tokens") -> None:
    """A 400 naming ``param`` when a completion length alone is beyond the model's context (no prompt
    could leave room for it). A value that fits the context but not beside the prompt is served, capped
    to the rest of the context (finish_reason "length"): see docs/serving.md."""
    if value is not None and value > context_length:
        raise APIError(400, f"{param} is too large: {value}. This model's context holds {context_length} tokens, "
                            f"prompt and completion together, so {param} can be at most {context_length} (a value "
                            "that does not fit beside the prompt is capped to the room left)", param=param,
                       code="invalid_value")

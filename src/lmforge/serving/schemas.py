"""Request bodies of the OpenAI-compatible routes (pydantic), and the OpenAI error body.

Unknown fields are ignored (as OpenAI's own server does for fields it does not know); fields that are
known but not served (``echo``, ``suffix``, non-text message parts) are refused with a 400 by the routes.

Every string of every body (at any depth) must be valid Unicode: JSON can spell a lone UTF-16 surrogate
(``"\\ud800"``), which no tokenizer can encode, so such a body is refused at validation with a 400
naming the field (the error's ``ctx["param"]``, read by the app's validation-error handler). ``stop``
takes at most :data:`MAX_STOP` strings of 1 to :data:`MAX_STOP_CHARS` characters (OpenAI's limit of 4),
and a chat message needs its ``content`` (OpenAI allows null only beside tool calls, not served here).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["MAX_STOP", "MAX_STOP_CHARS", "ChatCompletionRequest", "ChatMessage", "CompletionRequest",
           "DetokenizeRequest", "RequestBody", "SamplingFields", "StreamOptions", "TokenizeRequest", "error_body",
           "invalid_code_point"]

MAX_STOP = 4            # stop sequences per request (OpenAI's limit)
MAX_STOP_CHARS = 1000   # characters per stop sequence


def invalid_code_point(value: Any, path: str = "") -> tuple[str, int, int] | None:
    """The first string in ``value`` (a JSON value: strings, lists and dicts at any depth) that is not
    valid Unicode (a lone surrogate, which JSON's ``\\uXXXX`` escapes can spell), as ``(path, index,
    code point)``: ``path`` is the dotted field path (``messages.0.content``), ``index`` the character."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, exc.start, ord(value[exc.start])
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = invalid_code_point(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class RequestBody(BaseModel):
    """A JSON request body: unknown fields are ignored; a string that is not valid Unicode is refused."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = invalid_code_point(data) if isinstance(data, dict) else None  # a non-object: pydantic's error
        if found is not None:
            path, index, code = found
            raise PydanticCustomError(
                "invalid_code_point", "{param} holds an invalid code point U+{code} (a lone surrogate) at character "
                "{index}; send valid Unicode text (pair surrogates, or send the characters as UTF-8)",
                {"param": path, "code": f"{code:04X}", "index": index})
        return data


class StreamOptions(RequestBody):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """The fields both generation routes share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's range
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None            # <= 0 means off (as in vLLM)
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # 0 means off
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False            # vLLM's extension: keep going past end-of-sequence (benchmarks)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_sequences(cls, value: Any) -> Any:
        """At most MAX_STOP strings, each of 1 to MAX_STOP_CHARS characters (checked on the raw value, so
        that every refusal names ``stop`` itself)."""
        if value is None:
            return None
        strings = [value] if isinstance(value, str) else value
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise ValueError("stop must be a string or a list of strings")
        if len(strings) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} sequences, not {len(strings)}")
        for i, string in enumerate(strings):
            where = "stop" if isinstance(value, str) else f"stop sequence {i}"
            if not string:
                raise ValueError(f"{where} is empty; a stop sequence needs at least one character")
            if len(string) > MAX_STOP_CHARS:
                raise ValueError(f"{where} is {len(string)} characters long; at most {MAX_STOP_CHARS} are allowed")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(RequestBody):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]   # required, never null (null is OpenAI's for tool calls: not served)

    @field_validator("content", mode="before")
    @classmethod
    def _has_content(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("a message's content must be a string or a list of text parts, not null "
                             "(tool calls are not supported)")
        return value

    def text(self) -> str:
        """The content as plain text (text parts of a multi-part content joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(RequestBody):
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(RequestBody):
    tokens: list[int]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}

"""The one exception hierarchy of lmforge.

Every error a user can cause is an :class:`LmforgeError`. The CLI prints it as a single line
``error: <message>`` and exits with status 2; the server (a later layer) maps it to an
OpenAI-style JSON error with a 4xx status. Messages say what was wrong and what to do.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """Base class of every error caused by user input (files, options, prompts)."""


class ConfigError(LmforgeError):
    """A wrong configuration key, value, preset name or command-line option."""


class DataError(LmforgeError):
    """Missing, empty or unreadable input data, or data that does not fit the tokenizer."""


class CheckpointError(LmforgeError):
    """A path that is not an lmforge checkpoint, or a checkpoint that does not fit the run."""


class RequestError(LmforgeError):
    """A generation or scoring request that cannot be served (e.g. a prompt longer than the context).

    ``param`` names the request field at fault and ``code`` is a machine-readable reason; the server
    puts both into its OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class ContextLengthError(RequestError):
    """A prompt (or task input) that does not fit the model's context, with the numbers in its message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param, "context_length_exceeded")

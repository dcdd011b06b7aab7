"""The HTTP server: an OpenAI-compatible FastAPI app around the continuous-batching engine.

``create_app`` is imported on first use, so that ``lmforge.serving.request_log`` (used by
``lmforge requests``) loads without FastAPI and the model stack.
"""

from typing import Any

__all__ = ["APIError", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lmforge.serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'lmforge.serving' has no attribute {name!r}")

"""The HTTP server: an OpenAI-compatible FastAPI app around the continuous-batching engine."""

from lmforge.serving.app import APIError, create_app

__all__ = ["APIError", "create_app"]

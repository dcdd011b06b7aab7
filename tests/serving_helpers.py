"""Shared by the serving tests: a tiny model, a uvicorn server in a thread, SSE and error checks."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import torch
import uvicorn

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

LINES = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
         "How vexingly quick daft zebras jump; 0123456789", "Sphinx of black quartz, judge my vow?",
         "<|system|> <|user|> <|assistant|> :\n"]
PROMPT = "Pack my box with five"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox?"}]
NAME = "tiny"


def make_lm(seed: int = 1) -> LanguageModel:
    """A tiny model with large random weights, so that greedy outputs are varied."""
    tok = Tokenizer.train(LINES, kind="char")
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, block_size=160, n_layer=2, n_head=4, n_embd=32)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return LanguageModel(model, tok)


def slowed(lm: LanguageModel, seconds: float) -> LanguageModel:
    """``lm`` with every forward pass made ``seconds`` slower, so that generations last a while."""
    forward = lm.model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    lm.model.forward = slow
    return lm


def sse_events(text: str) -> list:
    """Parse a Server-Sent Events body: every event is ``data: ...`` followed by a blank line."""
    assert text.endswith("data: [DONE]\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


class Server:
    """uvicorn serving ``app`` in a background thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

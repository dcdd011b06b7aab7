"""The terminal chat of ``lmforge chat``: streamed answers, history within the context, commands.

Commands: ``/reset`` starts a new conversation (keeping the system message), ``/exit`` (or end of
input) leaves. When the conversation no longer fits the context with room for an answer, the
oldest turns are dropped, with a notice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from lmforge.api import LanguageModel
from lmforge.config import SamplingConfig
from lmforge.errors import RequestError
from lmforge.inference.prompts import context_error

HELP = "type a message; /reset starts over, /exit leaves"


def fit_history(lm: LanguageModel, messages: list[dict[str, str]], reserve: int) -> int:
    """Drop the oldest turns (never the system message or the newest user message) until the prompt
    leaves ``reserve`` tokens of context free; returns how many messages were dropped. Raises
    :class:`RequestError`, dropping nothing, when the newest message alone does not fit."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    length = len(lm.chat_prompt(messages[:first] + messages[-1:]))
    if length > lm.context_length:  # refuse before dropping any history
        raise context_error("conversation", length, lm.context_length, "messages")
    dropped = 0
    while len(lm.chat_prompt(messages)) + reserve > lm.context_length and len(messages) - first > 1:
        del messages[first]
        dropped += 1
        while len(messages) - first > 1 and messages[first]["role"] != "user":  # start at a user turn
            del messages[first]
            dropped += 1
    return dropped


def chat_loop(lm: LanguageModel, sampling: dict[str, Any], system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Run the conversation until ``/exit`` or end of input."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    reserve = min(SamplingConfig.from_options(None, **sampling).max_new_tokens, lm.context_length // 2)
    out.write(f"lmforge chat ({HELP})\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if not text:
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}; {HELP})\n")
            continue
        messages.append({"role": "user", "content": line})
        pieces: list[str] = []
        started = False  # whether "assistant> " is on the line
        try:
            dropped = fit_history(lm, messages, reserve)
            if dropped:
                out.write(f"(dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the "
                          f"context of {lm.context_length} tokens)\n")
            out.write("assistant> ")
            out.flush()
            started = True
            for piece in lm.stream_chat(messages, **sampling):
                pieces.append(piece)
                out.write(piece)
                out.flush()
            out.write("\n")
            messages.append({"role": "assistant", "content": "".join(pieces)})
        except RequestError as exc:
            messages.pop()
            out.write(f"{chr(10) if started else ''}(error: {exc})\n")
        except KeyboardInterrupt:
            out.write("\n(interrupted)\n")
            messages.append({"role": "assistant", "content": "".join(pieces)})

"""Incremental detokenization with stop strings, for streaming.

Text is released only when it is final: never half of a multi-byte character (byte-level BPE
decodes an incomplete UTF-8 sequence as U+FFFD, which is held back), and never the beginning of
what could still become a stop string. A stop string, and everything after it, is never emitted.
"""

from __future__ import annotations

from lmforge.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids one at a time; get back the new text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.emitted = 0       # characters of the text already released
        self.stopped = False   # a stop string was found
        self.text = ""         # the final text, once stopped or closed

    def push(self, token_id: int) -> str:
        """Add a token; return the newly releasable text (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if self.stop:
            cut = self._find_stop(text)
            if cut is not None:
                self.stopped = True
                self.text = text[:cut]
                return self._release(self.text, len(self.text))
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == REPLACEMENT:  # maybe an unfinished character
            safe -= 1
        safe -= self._stop_prefix_length(text[:safe])
        return self._release(text, safe)

    def close(self) -> str:
        """Generation ended: release whatever is left (without any stop string)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._release(self.text, len(self.text))

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = text[self.emitted:upto]
        self.emitted = upto
        return piece

    def _find_stop(self, text: str) -> int | None:
        """Start of the earliest stop string in the not-yet-released part (plus overlap)."""
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

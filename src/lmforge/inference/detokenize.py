"""Incremental detokenization with stop strings, for streaming.

Text is released only when it is final: never half of a multi-byte character (byte-level BPE
decodes an incomplete UTF-8 sequence as U+FFFD, which is held back), and never the beginning of
what could still become a stop string. A stop string, and everything after it, is never emitted.

Each token costs a decode of the last few tokens only, not of everything so far (as vLLM and Hugging
Face's streamers do): the new text is the decode of the tokens since the previous complete piece,
minus that of the previous piece's tokens, which give the decoder its context (a leading space that
a decoder drops at the start of a text is then kept). Decoding everything at each token would cost
O(n^2) over a completion: at 1,000 tokens, ~100 us per token per request.
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
        self.decoded = ""      # the text of ids[:self._read]
        self._prefix = 0       # ids[_prefix:_read]: the last complete piece, the next decode's context
        self._read = 0
        self.emitted = 0       # characters of the text already released
        self.stopped = False   # a stop string was found
        self.text = ""         # the final text, once stopped or closed

    def push(self, token_id: int) -> str:
        """Add a token; return the newly releasable text (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._extend()
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

    def _extend(self, final: bool = False) -> str:
        """``decoded``, extended by the tokens since ``_read`` once their text is complete (not ending in
        U+FFFD, unless ``final``)."""
        if self._read == len(self.ids):
            return self.decoded
        context = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if not text.startswith(context):  # a decoder that rewrites its context: decode everything
            self.decoded, self._prefix = self.tokenizer.decode(self.ids), self._read
            self._read = len(self.ids)
        elif len(text) > len(context) and (final or not text.endswith(REPLACEMENT)):
            self.decoded += text[len(context):]
            self._prefix, self._read = self._read, len(self.ids)
        return self.decoded

    def close(self) -> str:
        """Generation ended: release whatever is left (without any stop string)."""
        if not self.stopped:
            self.text = self._extend(final=True)
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

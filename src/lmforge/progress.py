"""Progress display: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


class LineProgress:
    """The subset of tqdm's interface we use, printing one line every ``interval`` seconds."""

    def __init__(self, total: float | None, desc: str, unit: str, interval: float = 10.0, **_: Any):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0.0
        self.postfix = ""
        self.start = self.last = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def _print(self) -> None:
        done = f"{100 * self.n / self.total:3.0f}%" if self.total else f"{self.n:.0f} {self.unit}"
        elapsed = time.monotonic() - self.start
        print(f"{self.desc}: {done} [{elapsed:.0f}s] {self.postfix}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._print()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: float | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar when stderr is a terminal, :class:`LineProgress` when it is not, a silent one when
    ``enabled`` is False. Each is a context manager that closes the bar (``with progress_bar(...) as bar``)."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
    return LineProgress(total, desc, unit)

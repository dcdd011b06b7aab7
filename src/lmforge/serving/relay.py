"""From the engine's thread to the event loop: :class:`EventRelay` carries events to asyncio queues."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

__all__ = ["EventRelay"]


class EventRelay:
    """Carries events from the engine's thread to asyncio queues on one loop, in order, waking the loop
    once per burst: the first event of a burst schedules a drain, later ones join it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue, object]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, queue: asyncio.Queue, item: object) -> None:
        """Any thread: deliver ``item`` to ``queue`` soon (raises RuntimeError once the loop is closed)."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, deque(), False
        for queue, item in items:
            queue.put_nowait(item)

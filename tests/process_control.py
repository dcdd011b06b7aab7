"""Killing a training process at a chosen moment, for the exact-resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], extra_delay: float = 0.0) -> None:
    """SIGKILL ``process`` once ``ready()`` holds (plus ``extra_delay`` seconds), and reap it."""
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, process.stderr.read() if process.stderr else "process ended early"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(extra_delay)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

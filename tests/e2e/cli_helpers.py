"""Running the ``lmforge`` command as a user does, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CLI = [sys.executable, "-m", "lmforge"]


def lmforge(*args: object, timeout: float = 300, input: str | None = None,
            threads: int | None = None) -> subprocess.CompletedProcess:
    """Run ``lmforge ARGS`` in a fresh process; ``threads`` caps torch's threads (tiny models: 1 is fastest)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, input=input,
                          env=env)


def lmforge_all(*commands: tuple, workers: int = 3, threads: int | None = None) -> list[subprocess.CompletedProcess]:
    """Several independent CLI runs at once (each pays the ~2 s start-up of Python and torch)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda command: lmforge(*command, threads=threads), commands))


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line 'error: ...' on stderr, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

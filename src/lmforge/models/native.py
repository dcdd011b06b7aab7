"""lmforge's C kernels (``models/*.c``): compiled on first use, cached, and loaded with ctypes.

A kernel's C file is compiled with the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native``,
OpenMP when the compiler has it, which then shares torch's OpenMP runtime) into
``$LMFORGE_CACHE_DIR/kernels`` (default ``~/.cache/lmforge/kernels``), keyed by the source and the
headers beside it, the compiler and the CPU, written atomically, and loaded with ctypes. Without a compiler, or with
``LMFORGE_NATIVE_KERNELS=0``, :func:`load` returns None and the models use torch's kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.fileio import atomic_path

__all__ = ["kernel_threads", "load", "torch_on_one_thread"]

logger = logging.getLogger(__name__)
_held = threading.local()  # .threads: torch's thread count while torch_on_one_thread holds it at one


def kernel_threads() -> int:
    """How many threads the C kernels use: torch's intra-op count (kept for them by torch_on_one_thread)."""
    return getattr(_held, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """Run torch's own operations on one thread in this block, while the C kernels keep torch's count.

    For a forward pass whose heavy work is all in the C kernels (a small decoding step), torch's other
    operations are tiny (a layer norm over 16 x 256 values), so splitting them gains nothing, and every
    split makes both threads wait for the slower one: under load, when a core is also serving HTTP,
    that one may have been preempted for a time slice (measured in docs/benchmarks.md).
    """
    threads = torch.get_num_threads()
    if threads == 1 or getattr(_held, "threads", None):
        yield
        return
    _held.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _held.threads = None


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``models/NAME.c``, or None where native kernels are off or cannot be built."""
    if os.environ.get("LMFORGE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        return ctypes.CDLL(str(_compiled(Path(__file__).with_name(f"{name}.c"))))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("native kernel %s unavailable (%s); using torch's kernels", name, exc)
        return None


def _compiled(source: Path) -> Path:
    """The shared library built from ``source`` for this compiler and CPU: built (atomically) if missing."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler found ($CC or cc)")
    code = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # + includes
    key = hashlib.sha256(code + compiler.encode() + _cpu_signature().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LMFORGE_CACHE_DIR", Path.home() / ".cache" / "lmforge")) / "kernels"
    library = cache / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    base = [compiler, "-O3", "-march=native", "-fPIC", "-shared", str(source), "-lm"]
    with tempfile.TemporaryDirectory() as work:
        built = Path(work) / f"{source.stem}.so"
        for flags in (["-fopenmp"], []):  # without OpenMP (e.g. Apple's clang): one thread
            result = subprocess.run([*base, *flags, "-o", str(built)], capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                break
        else:
            raise OSError(f"compiling {source.name} failed: {result.stderr.strip()[:300]}")
        with atomic_path(library) as tmp:
            shutil.copyfile(built, tmp)
    logger.info("compiled %s", library)
    return library


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return platform.machine() + "".join(sorted(set(lines)))

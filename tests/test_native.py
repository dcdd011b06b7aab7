"""Compiling and caching lmforge's C kernels (lmforge.models.native)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmforge.models import native

MODELS = Path(native.__file__).parent


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_changed_header_builds_a_new_library(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("cpu_linear.c", "bf16.h"):
        shutil.copy(MODELS / name, sources / name)
    first = native._compiled(sources / "cpu_linear.c")
    assert first.exists() and native._compiled(sources / "cpu_linear.c") == first  # cached
    with open(sources / "bf16.h", "a") as header:
        header.write("/* changed */\n")
    second = native._compiled(sources / "cpu_linear.c")
    assert second != first and second.exists()

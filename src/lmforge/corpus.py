"""The embedded default corpus: English text that ships with every Python installation.

No download: the documents are the Python language reference topics of ``pydoc_data.topics`` and,
for each module of the standard library (read with :mod:`ast`, never imported), its module, class
and function docstrings; optionally the module sources too. Modules are visited in sorted path
order, so the corpus is the same on every run of the same Python version (about 1.9 million
characters for Python 3.11).
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmforge.fileio import atomic_path

SKIPPED_PACKAGES = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                    "tkinter", "ensurepip", "__pycache__"}
MIN_DOCSTRING_CHARS = 40


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not SKIPPED_PACKAGES.intersection(p.relative_to(root).parts[:-1]))


def _module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstrings(tree: ast.Module, module: str) -> str:
    """The module's docstrings in source order, each titled with its qualified name."""
    sections: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    sections.append(f"{name}\n\n{doc}")
                visit(child, name)

    doc = ast.get_docstring(tree)
    if doc and len(doc) >= MIN_DOCSTRING_CHARS:
        sections.append(f"{module}\n\n{doc}")
    visit(tree, module)
    return "\n\n".join(sections)


def default_documents(include_sources: bool = False) -> Iterator[str]:
    """Yield the documents of the default corpus, in a fixed order."""
    yield from _pydoc_topics()
    for path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        text = _docstrings(tree, _module_name(path))
        if text:
            yield text
        if include_sources and source.strip():
            yield source


def write_default_corpus(path: str | Path, include_sources: bool = False) -> Path:
    """Write the default corpus as JSONL (one ``{"text": ...}`` record per document); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in default_documents(include_sources):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def describe() -> str:
    return f"Python {sys.version.split()[0]} language reference topics and standard-library docstrings"

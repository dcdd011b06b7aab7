"""The house's layering (docs/architecture.md, "Layers"): every import in ``src/lmforge`` points down or
sideways, never up, and no module imports itself back through others. Imports inside functions and under
``TYPE_CHECKING`` count too; the lazy facade ``lmforge/__init__.py`` is the only exception."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

#: Bottom to top, as in docs/architecture.md; a module may import its own layer and those below.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "fileio", "progress", "version"),
    ("options", "config"),
    ("tokenizer",),
    ("corpus",),
    ("data",),
    ("device",),
    ("models",),
    ("training",),
    ("inference",),
    ("interop",),
    ("alignment",),
    ("api",),
    ("evaluation",),
    ("recipes",),
    ("serving",),
    ("quickstart", "chat", "cli_parsing", "cli_alignment", "cli", "__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the lmforge modules it imports (``from pkg import submodule`` resolved to the submodule)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("lmforge"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if base.startswith("lmforge"):
                    for alias in node.names:
                        targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    g = import_graph()
    g.pop("lmforge")  # the lazy facade: `from lmforge import LanguageModel` imports the API on first use
    for targets in g.values():
        targets.discard("lmforge")
    return g


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_imports_point_down_the_documented_layers(graph):
    upward = [f"{m} -> {t}" for m, targets in sorted(graph.items()) for t in sorted(targets)
              if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_layer_table_is_the_documented_one():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| `([\w.]+)[^|]*\|", doc, flags=re.M)  # number, first module of the row
    assert [int(number) for number, _ in rows] == list(range(len(LAYERS)))
    for (_, first), names in zip(rows, LAYERS):
        assert first.split("/")[0].removesuffix(".py") in names


def test_api_serving_and_inference_do_not_use_the_evaluation(graph):
    users = sorted(m for m, targets in graph.items() if any(t.startswith("lmforge.evaluation") for t in targets)
                   and m.split(".")[1] in ("api", "serving", "inference"))
    assert users == []


def test_the_serving_bottom_knows_only_errors_metrics_and_the_relay(graph):
    allowed = {"lmforge.serving.errors", "lmforge.serving.metrics", "lmforge.serving.relay",
               "lmforge.api", "lmforge.inference.engine"}  # the last two for annotations only
    assert graph["lmforge.serving.state"] <= allowed


def _source_lines(pattern: str) -> list[str]:
    return [f"{path.relative_to(SRC)}:{n}" for path in sorted(SRC.rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if re.search(pattern, line)]


def test_one_generation_loop_one_sampling_parser_one_bos_rule_one_context_error():
    assert [x.split(":")[0] for x in _source_lines(r"\bTokenGenerator\(")] == ["inference/completion.py"]
    assert _source_lines(r"build_dataclass\(\s*SamplingConfig\b") == []  # options go through from_options
    assert [x.split(":")[0] for x in _source_lines(r"def from_options\(")] == ["config.py"]
    # the tokenizer defines the rule's inputs; the task models' row encoders use start_ids as a separator and
    # the exporters copy adds_bos into other formats' metadata: none of them builds a prompt
    bos = {x.split(":")[0] for x in _source_lines(r"\b(tokenizer|self)\.(adds_bos|start_ids)\b")}
    assert bos - {"tokenizer.py", "data/qa.py", "data/task_rows.py", "interop/hf.py", "interop/gguf.py"} == \
        {"inference/prompts.py"}
    assert {x.split(":")[0] for x in _source_lines(r"model's context is")} == {"inference/prompts.py"}

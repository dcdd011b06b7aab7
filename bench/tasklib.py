"""Shared pieces of the task-model benchmarks (bench/task_pretrain.py, classify.py, squad.py,
summarize.py, lstm_vs_transformer.py, translate.py): where the data lives, the fixed train/eval
splits, the shipped recipe a benchmark starts from (``lmforge.recipes.catalog``, overridden only where
the benchmark varies something), fine-tuning through ``lmforge.recipes.finetune``, and the printed table.

The splits are defined once here, so the pretraining corpus provably leaves out every evaluation part:
- SST-2: every 5th row of ``train.tsv`` (0-based index % 5 == 4) is the test set.
- SQuAD: articles sorted by title; every 6th (index % 6 == 5) is an evaluation article (6 of 36).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.options import build_dataclass, deep_merge
from lmforge.recipes.catalog import recipe_values

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)} (see {DATA / 'README.md'})")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# Datasets and their fixed splits
# ------------------------------------------------------------------------------------------
def ag_news(split: str) -> list[dict]:
    """AG News ``train`` or ``test`` as ``{"text": "title. description", "label": class name}``."""
    names = (DATA / "ag_news" / "classes.txt").read_text(encoding="utf-8").split()
    with open(DATA / "ag_news" / f"{split}.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return [{"text": f"{title}. {body}".replace("\\n", " ").replace("\\", " "), "label": names[int(k) - 1]}
            for k, title, body in rows]


def sst2(split: str) -> list[dict]:
    """SST-2 ``train`` (4 of every 5 rows) or ``test`` (every 5th row) of ``train.tsv``."""
    with open(DATA / "sst2" / "train.tsv", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    keep = (lambda i: i % 5 == 4) if split == "test" else (lambda i: i % 5 != 4)
    names = {"0": "negative", "1": "positive"}
    return [{"text": s, "label": names[y]} for i, (s, y) in enumerate(rows) if keep(i)]


def squad(split: str) -> list[dict]:
    """SQuAD v1.1 (``dev_shared.jsonl``) records of the ``train`` (30) or ``eval`` (6) articles."""
    records = read_jsonl(DATA / "squad_v1.1" / "dev_shared.jsonl")
    titles = sorted({r["title"] for r in records})
    held = {t for i, t in enumerate(titles) if i % 6 == 5}
    return [r for r in records if (r["title"] in held) == (split == "eval")]


def aeslc(split: str) -> list[dict]:
    """AESLC ``train`` or ``dev`` records: ``document`` (email body), ``summary`` (subject line)."""
    return read_jsonl(DATA / "aeslc" / f"{split}.jsonl")


def split_off(records: list[dict], every: int = 10, fold: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val): every ``every``-th record goes to val (for checkpoint selection, never the test);
    ``fold`` k moves that choice k records earlier, so folds 0..every-1 hold out disjoint records."""
    held = (every - 1 - fold) % every
    return ([r for i, r in enumerate(records) if i % every != held],
            [r for i, r in enumerate(records) if i % every == held])


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def run_finetune(options: dict[str, Any]) -> tuple[Any, float]:
    """``lmforge.recipes.finetune.finetune`` on a nested dict of FinetuneConfig options; (result, seconds)."""
    from lmforge.config import FinetuneConfig
    from lmforge.recipes.finetune import finetune

    config = build_dataclass(FinetuneConfig, options)
    start = time.perf_counter()
    result = finetune(config)
    return result, time.perf_counter() - start


def model_knobs(pairs: list[str]) -> dict[str, Any]:
    """``--model`` options: ``["n_embd=128", "dropout=0.3"]`` -> ``{"n_embd": 128, "dropout": 0.3}``
    (values read as YAML)."""
    import yaml

    return {name.strip(): yaml.safe_load(value) for name, _, value in (pair.partition("=") for pair in pairs)}


BENCH_TRAIN = dict(progress=False, device="cpu")  # every benchmark: on the CPU, logging instead of a bar
QUICK_TRAIN = dict(max_time=None, max_steps=8, eval_interval=0, eval_windows=32, final_eval_windows=64)


def given(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without its None entries (at any depth): a flag left at None keeps the recipe's value."""
    return {key: given(value) if isinstance(value, dict) else value for key, value in values.items()
            if value is not None}


def recipe_options(name: str, command: str = "finetune", quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """The shipped recipe ``name`` (``lmforge.recipes.catalog.recipe_values``) with the benchmark's
    overrides: top-level options or nested sections (``train={"lr": ...}``); None values leave the
    recipe's. Always on the CPU without a progress bar; ``quick``: 8 steps (no time budget) and small
    evaluations, unless the overrides say otherwise."""
    options = deep_merge(recipe_values(name, command), {"train": BENCH_TRAIN})
    overrides = given(overrides)
    if quick:
        options = deep_merge(options, {"train": QUICK_TRAIN})
        overrides.get("train", {}).pop("max_time", None)
    return deep_merge(options, overrides)


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def print_table(title: str, rows: list[dict[str, Any]], columns: list[str], compare: str = "diff") -> None:
    """Rows of metrics side by side, then the second row minus (or over) the first for each column."""
    print(f"\n{title}")
    label = "difference (2nd - 1st)" if compare == "diff" else "ratio (2nd / 1st)"
    width = max(len(label), *(len(r["model"]) for r in rows)) + 2
    print(f"{'model':<{width}}" + "".join(f"{c:>12}" for c in columns))
    for r in rows:
        print(f"{r['model']:<{width}}" + "".join(f"{_fmt(r.get(c)):>12}" for c in columns))
    if len(rows) >= 2:
        first, last = rows[0], rows[1]
        cells = []
        for c in columns:
            a, b = first.get(c), last.get(c)
            if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                cells.append("")
            elif compare == "ratio":
                cells.append(f"{b / a:.2f}x" if a else "")
            else:
                cells.append(f"{b - a:+.2f}")
        print(f"{label:<{width}}" + "".join(f"{c:>12}" for c in cells))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------------
# Sequence to sequence (summarize.py, translate.py)
# ------------------------------------------------------------------------------------------
def bpe_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> Path:
    """A byte-level BPE tokenizer trained on ``texts`` (kept in ``folder`` and reused)."""
    from lmforge.recipes.pipeline import train_tokenizer

    return train_tokenizer(None, folder, "bpe", vocab_size, texts=texts, reuse=True)


def decode_all(method: Any, sources: list[str], batch_size: int = 32, **options: Any) -> list[str]:
    """``method`` (``lm.summarize`` or ``lm.translate``) over ``sources`` in batches."""
    outputs: list[str] = []
    for start in range(0, len(sources), batch_size):
        outputs += method(sources[start:start + batch_size], **options)
    return outputs

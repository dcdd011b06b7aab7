"""Evaluation suites: several tasks from one YAML file, with thresholds that can gate a release.

.. code-block:: yaml

    tasks:
      - task: perplexity
        data: val.txt              # relative paths resolve against the suite file's folder
        max: {perplexity: 60}
      - task: qa
        name: squad                # optional label for tables and failure lines (default: the task)
        data: squad.jsonl          # a file or a list of files
        limit: 50                  # the first 50 records
        min: {f1: 5.0, exact_match: 1.0}
        max_new_tokens: 24         # any other key is an option of the task

:func:`run_suite` returns the reports and the failed thresholds as lines such as
``qa f1 3.20 < 5.00``; :func:`main_eval` is what ``lmforge eval`` runs, with exit code 1 when a
threshold fails.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError, DataError
from lmforge.evaluation.harness import (
    TASK_METRICS,
    TASKS,
    DataPaths,
    check_limit,
    check_options,
    data_paths,
    evaluate,
    format_table,
    task_options,
    write_report,
)
from lmforge.evaluation.options import check_option_type
from lmforge.fileio import check_output_file
from lmforge.options import field_names

if TYPE_CHECKING:
    from lmforge.api import LanguageModel

log = logging.getLogger(__name__)

SUITE_KEYS = ("tasks",)
TASK_KEYS = ("task", "name", "data", "limit", "min", "max")  # and the task's own options
_SAMPLING = field_names(SamplingConfig)  # the options SamplingConfig checks; the others: evaluation.options


@dataclass
class SuiteTask:
    """One validated entry of a suite."""

    task: str
    name: str
    data: Path | list[Path] | None
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)


def _bounds(value: Any, task: str, key: str, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must map metric names to numbers, e.g. {{{TASK_METRICS[task][0]}: 1.0}}")
    bounds = {}
    for metric, bound in value.items():
        if metric not in TASK_METRICS[task]:
            raise ConfigError(f"{where}: the {task} task has no metric {metric!r} (in '{key}'); its metrics: "
                              f"{', '.join(TASK_METRICS[task])}")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise ConfigError(f"{where}: the {key} threshold of {metric} must be a number, not {bound!r}")
        bounds[metric] = float(bound)
    return bounds


def load_suite(path: str | Path) -> list[SuiteTask]:
    """Read and check a suite file: every task name, option, metric and data file, before any
    model runs. Errors are ConfigError (the suite) or DataError (a missing data file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} should hold a mapping with a 'tasks' list")
    unknown = sorted(set(document) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a suite has only 'tasks'")
    entries = document.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty list of tasks")
    suite = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}, task {number}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with 'task' and 'data', not {entry!r}"[:300])
        task = entry.get("task")
        if task not in TASKS:
            what = "has no 'task'" if task is None else f"unknown task {task!r}"
            raise ConfigError(f"{where}: {what}; tasks: {', '.join(TASKS)}")
        options = {k: v for k, v in entry.items() if k not in TASK_KEYS}
        allowed = (*TASK_KEYS, *task_options(task))
        for key in options:
            if key not in task_options(task):
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: unknown key {key!r}{hint}; a {task} task takes {', '.join(allowed)}")
        try:
            limit = check_limit(entry.get("limit"))
            for key, value in options.items():
                check_option_type(task, key, value)
            sampling = {k: v for k, v in options.items() if k in _SAMPLING}
            if sampling:
                SamplingConfig.from_options(**sampling)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        data = entry.get("data")
        if data is None and task != "diversity":
            raise ConfigError(f"{where}: the {task} task needs 'data' (a file, or a list of files)")
        if data is not None:
            items = data if isinstance(data, list) else [data]
            if not items or not all(isinstance(d, str) and d for d in items):
                raise ConfigError(f"{where}: 'data' must be a file path or a list of file paths")
            try:
                resolved = data_paths([path.parent / d for d in items])
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            data = resolved if isinstance(data, list) else resolved[0]
        name = entry.get("name", task)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be text")
        suite.append(SuiteTask(task, name, data, limit, options, _bounds(entry.get("min"), task, "min", where),
                               _bounds(entry.get("max"), task, "max", where)))
    counts = Counter(t.name for t in suite)
    for number, t in enumerate(suite, 1):  # tell repeated tasks apart in tables and failure lines
        if counts[t.name] > 1 and "name" not in entries[number - 1]:
            t.name = f"{t.task}#{number}"
    return suite


def _number(value: float, bound: float) -> str:
    small = abs(value) < 1 and abs(bound) < 1
    return f"{value:.4f}" if small else f"{value:.2f}"


def check_thresholds(report: dict[str, Any], minimum: dict[str, float] | None = None,
                     maximum: dict[str, float] | None = None, name: str | None = None) -> list[str]:
    """Failure lines (``qa f1 3.20 < 5.00``) for the report's metrics below a minimum or above a
    maximum; a NaN metric fails every bound."""
    name = name or report.get("name") or report["task"]
    failures = []
    for metric, bound in (minimum or {}).items():
        value = float(report["metrics"][metric])
        if not value >= bound:
            failures.append(f"{name} {metric} {_number(value, bound)} < {_number(bound, value)}")
    for metric, bound in (maximum or {}).items():
        value = float(report["metrics"][metric])
        if not value <= bound:
            failures.append(f"{name} {metric} {_number(value, bound)} > {_number(bound, value)}")
    return failures


def _load(lm_or_path: LanguageModel | str | Path | list[str | Path], device: str, dtype: str) -> Any:
    """A loaded model as it is; a path loaded; a list of paths loaded as one ensemble."""
    if hasattr(lm_or_path, "model") and hasattr(lm_or_path, "tokenizer"):
        return lm_or_path
    from lmforge.api import LanguageModel  # the entry point for the CLI: loading is the API layer's job

    if isinstance(lm_or_path, list):
        return LanguageModel.load_ensemble(lm_or_path, device=device, dtype=dtype)
    return LanguageModel.load(lm_or_path, device=device, dtype=dtype)


def run_suite(lm_or_path: LanguageModel | str | Path, suite_path: str | Path, limit: int | None = None,
              progress: bool = True, device: str = "auto",
              dtype: str = "fp32") -> tuple[list[dict[str, Any]], list[str]]:
    """Run every task of a suite file. Returns the reports (each with its ``name``, ``thresholds``
    and ``passed``) and the failure lines. ``limit`` caps every task's own limit. A checkpoint path
    is loaded (on ``device``, in ``dtype``) after the suite has been checked."""
    suite = load_suite(suite_path)
    limit = check_limit(limit)
    lm = _load(lm_or_path, device, dtype)
    reports, failures = [], []
    for entry in suite:
        task_limit = min((x for x in (entry.limit, limit) if x is not None), default=None)
        log.info("evaluating %s (%s)", entry.name, entry.task)
        report = evaluate(lm, entry.task, entry.data, task_limit, progress, **entry.options)
        failed = check_thresholds(report, entry.minimum, entry.maximum, entry.name)
        report = {"name": entry.name, **report, "thresholds": {"min": entry.minimum, "max": entry.maximum},
                  "passed": not failed}
        reports.append(report)
        failures += failed
    return reports, failures


def main_eval(checkpoint: str | Path | list[str | Path], task: str | None = None, data: DataPaths = None,
              suite: str | Path | None = None, limit: int | None = None, out: str | Path | None = None,
              device: str = "auto", dtype: str = "fp32", progress: bool = True, **options: Any) -> int:
    """What ``lmforge eval`` runs: load the checkpoint (a list of them: an ensemble), run one task
    (``task`` on ``data`` with the task's ``options``) or a ``suite`` file, print the table and any
    failed thresholds, write the JSON report to ``out`` if given. Returns the exit code: 0, or 1 when a
    suite threshold fails. Everything is checked (task, options, suite, data files, output path) before
    the model loads."""
    options = {k: v for k, v in options.items() if v is not None}
    if suite is not None and (task is not None or data is not None or options):
        raise ConfigError("give either a suite (--suite) or one task (--task, --data and its options), not both")
    if suite is None and task is None:
        raise ConfigError("nothing to evaluate: give --task (with --data) or --suite")
    if out is not None:
        check_output_file(out)
    limit = check_limit(limit)
    if suite is not None:
        load_suite(suite)
    else:
        if task not in TASKS:
            raise ConfigError(f"unknown evaluation task {task!r}; tasks: {', '.join(TASKS)}")
        check_options(task, options)
        if data is None and task != "diversity":
            raise ConfigError(f"the {task} task needs data (--data FILE)")
        data_paths(data)
    lm = _load(checkpoint, device, dtype)
    failures: list[str] = []
    if suite is not None:
        reports, failures = run_suite(lm, suite, limit, progress)
    else:
        reports = [evaluate(lm, task, data, limit, progress, **options)]
    print(format_table(reports))
    for line in failures:
        print(f"FAILED: {line}")
    if suite is not None:
        print(f"{len(failures)} threshold(s) failed" if failures else "all thresholds passed")
    if out is not None:
        write_report(out, reports, checkpoint=str(checkpoint), suite=None if suite is None else str(suite),
                     passed=not failures, failures=failures)
        print(f"report written to {out}")
    return 1 if failures else 0

"""Evaluation: metrics wrapping the reference libraries, tasks over data files, suites with thresholds.

>>> from lmforge.evaluation import bleu, squad_scores, evaluate
>>> bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
>>> report = evaluate(lm, "qa", "squad.jsonl", limit=50)

See :mod:`lmforge.evaluation.metrics` for the metrics and their scales, :mod:`.harness` for the
tasks, :mod:`.options` for their options, :mod:`.suite` for YAML suites and :func:`main_eval`
(``lmforge eval``), and :mod:`.significance` for whether one model's score beats another's on the same
test set. The evaluation sits above the API and the text core (:mod:`lmforge.inference`): ``Generation``
and ``generate_ids`` are :class:`lmforge.inference.completion.Completion` and
:func:`~lmforge.inference.completion.complete_ids` (batched generation from token ids on a bare model,
for training loops), ``label_scores`` is :func:`lmforge.inference.scoring.label_scores`.
"""

import importlib
from typing import Any

#: public name -> (module, name there); imported on first use, so that reading the option table
#: (``lmforge.evaluation.options``, e.g. for ``lmforge --help``) does not import torch
_EXPORTS = {
    'CLASSIFICATION_TEMPLATE': ('lmforge.evaluation.harness', 'CLASSIFICATION_TEMPLATE'),
    'Generation': ('lmforge.inference.completion', 'Completion'),
    'PairedDifference': ('lmforge.evaluation.significance', 'PairedDifference'),
    'QA_TEMPLATE': ('lmforge.evaluation.harness', 'QA_TEMPLATE'),
    'TASKS': ('lmforge.evaluation.harness', 'TASKS'),
    'TASK_METRICS': ('lmforge.evaluation.harness', 'TASK_METRICS'),
    'accuracy': ('lmforge.evaluation.metrics', 'accuracy'),
    'bleu': ('lmforge.evaluation.metrics', 'bleu'),
    'check_thresholds': ('lmforge.evaluation.suite', 'check_thresholds'),
    'chrf': ('lmforge.evaluation.metrics', 'chrf'),
    'distinct_n': ('lmforge.evaluation.metrics', 'distinct_n'),
    'evaluate': ('lmforge.evaluation.harness', 'evaluate'),
    'exact_match': ('lmforge.evaluation.metrics', 'exact_match'),
    'format_table': ('lmforge.evaluation.harness', 'format_table'),
    'generate_ids': ('lmforge.inference.completion', 'complete_ids'),
    'generation_examples': ('lmforge.evaluation.harness', 'generation_examples'),
    'generation_metrics': ('lmforge.evaluation.harness', 'generation_metrics'),
    'label_scores': ('lmforge.evaluation.harness', 'label_scores'),
    'load_suite': ('lmforge.evaluation.suite', 'load_suite'),
    'macro_f1': ('lmforge.evaluation.metrics', 'macro_f1'),
    'main_eval': ('lmforge.evaluation.suite', 'main_eval'),
    'mcnemar': ('lmforge.evaluation.significance', 'mcnemar'),
    'normalize_answer': ('lmforge.evaluation.metrics', 'normalize_answer'),
    'paired_bootstrap': ('lmforge.evaluation.significance', 'paired_bootstrap'),
    'rouge': ('lmforge.evaluation.metrics', 'rouge'),
    'run_suite': ('lmforge.evaluation.suite', 'run_suite'),
    'self_bleu': ('lmforge.evaluation.metrics', 'self_bleu'),
    'squad_scores': ('lmforge.evaluation.metrics', 'squad_scores'),
    'task_options': ('lmforge.evaluation.harness', 'task_options'),
    'token_f1': ('lmforge.evaluation.metrics', 'token_f1'),
    'vocabulary_coverage': ('lmforge.evaluation.metrics', 'vocabulary_coverage'),
    'write_report': ('lmforge.evaluation.harness', 'write_report'),
}

__all__ = [
    "CLASSIFICATION_TEMPLATE", "QA_TEMPLATE", "TASKS", "TASK_METRICS", "Generation", "PairedDifference",
    "accuracy", "bleu", "check_thresholds", "chrf", "distinct_n", "evaluate", "exact_match", "format_table",
    "generate_ids", "generation_examples", "generation_metrics", "label_scores", "load_suite", "macro_f1",
    "main_eval", "mcnemar", "normalize_answer", "paired_bootstrap", "rouge", "run_suite", "self_bleu",
    "squad_scores", "task_options", "token_f1", "vocabulary_coverage", "write_report",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge.evaluation' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value

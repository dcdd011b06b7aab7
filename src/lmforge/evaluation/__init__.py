"""Evaluation: metrics wrapping the reference libraries, tasks over data files, suites with thresholds.

>>> from lmforge.evaluation import bleu, squad_scores, evaluate
>>> bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
>>> report = evaluate(lm, "qa", "squad.jsonl", limit=50)

See :mod:`lmforge.evaluation.metrics` for the metrics and their scales, :mod:`.harness` for the
tasks, :mod:`.suite` for YAML suites and :func:`main_eval` (``lmforge eval``), and
:mod:`.generation` for batched generation from token ids on a bare model (for training loops), and
:mod:`.significance` for whether one model's score beats another's on the same test set.
"""

from lmforge.evaluation.generation import Generation, generate_ids
from lmforge.evaluation.harness import (
    CLASSIFICATION_TEMPLATE,
    QA_TEMPLATE,
    TASK_METRICS,
    TASKS,
    evaluate,
    format_table,
    generation_examples,
    generation_metrics,
    label_scores,
    task_options,
    write_report,
)
from lmforge.evaluation.metrics import (
    accuracy,
    bleu,
    chrf,
    distinct_n,
    exact_match,
    macro_f1,
    normalize_answer,
    rouge,
    self_bleu,
    squad_scores,
    token_f1,
    vocabulary_coverage,
)
from lmforge.evaluation.significance import PairedDifference, mcnemar, paired_bootstrap
from lmforge.evaluation.suite import check_thresholds, load_suite, main_eval, run_suite

__all__ = [
    "CLASSIFICATION_TEMPLATE", "QA_TEMPLATE", "TASKS", "TASK_METRICS", "Generation", "PairedDifference",
    "accuracy", "bleu", "check_thresholds", "chrf", "distinct_n", "evaluate", "exact_match", "format_table",
    "generate_ids", "generation_examples", "generation_metrics", "label_scores", "load_suite", "macro_f1",
    "main_eval", "mcnemar", "normalize_answer", "paired_bootstrap", "rouge", "run_suite", "self_bleu",
    "squad_scores", "task_options", "token_f1", "vocabulary_coverage", "write_report",
]

"""Evaluation tasks: run a language model over a data file and compute metrics.

>>> from lmforge import LanguageModel
>>> from lmforge.evaluation import evaluate, format_table
>>> lm = LanguageModel.load("runs/quickstart")
>>> report = evaluate(lm, "qa", "squad.jsonl", limit=50)
>>> print(format_table([report]))

Tasks (:data:`TASKS`; :data:`TASK_METRICS` lists what each reports):

``perplexity``
    Text files (each one document) or JSON(L) records with a text field. Token-weighted over
    documents: ``loss`` is the mean negative log-likelihood per token (nats), ``perplexity`` its
    exponential, ``tokens`` the count. Scored with :meth:`LanguageModel.token_logprobs`.
``generation``
    Records in a fine-tuning format (chat, alpaca, prompt/completion; see
    :mod:`lmforge.data.formats`), or any JSON records with ``prompt_template`` + ``reference_field``.
    Greedy generation by default, compared with the reference: ``bleu``, ``chrf``, ``rouge1/2/L``
    (0-100), ``eos_rate`` (share of generations that ended with the end-of-sequence token, i.e. the
    model learnt to stop) and ``mean_new_tokens``.
``qa``
    SQuAD-style records ``{context, question, answers: {text: [...]}}`` (or ``answers`` as a list of
    strings), asked through :data:`QA_TEMPLATE`; greedy answer up to a newline; SQuAD
    ``exact_match`` and ``f1`` (0-100). Contexts too long for the model lose their start; the
    report's ``truncated`` counts them.
``classification``
    JSONL, CSV or TSV with a text column (``text`` or ``sentence``) and a ``label`` column.
    Zero-shot: every candidate label is scored by log P(label | prompt) (:func:`label_scores`) and
    the best one wins: ``accuracy``, ``macro_f1`` (0-1).
``diversity``
    Open-ended sampling (temperature 1) from prompts in a file, or from nothing: ``distinct_1``,
    ``distinct_2``, ``vocabulary_coverage`` (0-1), ``self_bleu`` (0-100, lower is more diverse).

Every task returns a report ``{"task", "data", "examples", "metrics": {...}, "seconds", ...}``;
:func:`format_table` prints reports, :func:`write_report` saves them as JSON.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.config import SamplingConfig
from lmforge.data.formats import prompt_and_reference, read_records, record_format
from lmforge.data.labelled import FieldName, read_labelled
from lmforge.data.task_rows import read_pairs
from lmforge.errors import ConfigError, DataError
from lmforge.evaluation import metrics as M
from lmforge.evaluation.options import check_option_type
from lmforge.fileio import atomic_write_text, check_output_file
from lmforge.inference.completion import Completion, complete_ids
from lmforge.inference.prompts import CLASSIFICATION_TEMPLATE, QA_TEMPLATE, encode_prompt, prompt_head, qa_prompt
from lmforge.inference.scoring import label_logprobs, label_scores
from lmforge.progress import progress_bar
from lmforge.tokenizer import Tokenizer
from lmforge.version import __version__

if TYPE_CHECKING:  # the harness sits above the API: it runs a LanguageModel it is given
    from lmforge.api import LanguageModel

__all__ = ["CLASSIFICATION_TEMPLATE", "QA_TEMPLATE", "RUNNERS", "TASKS", "TASK_METRICS", "check_options", "evaluate",
           "format_table", "generation_examples", "generation_metrics", "label_scores", "qa_prompt", "task_options",
           "write_report"]

DataPaths = str | Path | Sequence[str | Path] | None

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity", "loss", "tokens"),
    "generation": ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "eos_rate", "mean_new_tokens"),
    "qa": ("exact_match", "f1"),
    "classification": ("accuracy", "macro_f1"),
    "diversity": ("distinct_1", "distinct_2", "self_bleu", "vocabulary_coverage", "mean_new_tokens"),
}
TASKS = tuple(TASK_METRICS)
SAMPLES_IN_REPORT = 3  # a few examples of predictions kept in each report, to eyeball


# ------------------------------------------------------------------------------------------
# Data files
# ------------------------------------------------------------------------------------------
def data_paths(data: DataPaths) -> list[Path]:
    """``data`` as a list of existing files (None: no files)."""
    if data is None:
        return []
    items = [data] if isinstance(data, (str, Path)) else list(data)
    paths = [Path(p) for p in items]
    for path in paths:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    return paths


def _records(data: DataPaths, task: str) -> list[dict[str, Any]]:
    paths = data_paths(data)
    if not paths:
        raise DataError(f"the {task} task needs a data file")
    return [record for path in paths for record in read_records(path)]


def _limited(items: list[Any], limit: int | None) -> list[Any]:
    return items if limit is None else items[:limit]


def _text(value: Any, what: str, number: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"record {number}: {what} must be text, not {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------
# Perplexity
# ------------------------------------------------------------------------------------------
def run_perplexity(lm: LanguageModel, data: DataPaths, *, limit: int | None = None, progress: bool = True,
                   text_field: str = "text", stride: int | None = None) -> dict[str, Any]:
    """Token-weighted perplexity over documents (whole text files, or ``text_field`` of JSON records)."""
    records = _limited(_records(data, "perplexity"), limit)
    texts = [_text(r.get(text_field), f"field {text_field!r}", n) for n, r in enumerate(records, 1)]
    total_nll, tokens = 0.0, 0
    with progress_bar(len(texts), "eval perplexity", unit="doc", enabled=progress) as bar:
        for text in texts:
            if text:
                logprobs = lm.token_logprobs(text, stride=stride).double()
                total_nll -= float(logprobs.sum())
                tokens += len(logprobs)
            bar.update(1)
            if tokens:
                bar.set_postfix_str(f"ppl {math.exp(total_nll / tokens):.3f}")
    if not tokens:
        raise DataError("the perplexity data holds no text")
    loss = total_nll / tokens
    return {"examples": len(texts), "metrics": {"perplexity": math.exp(loss), "loss": loss, "tokens": tokens}}


# ------------------------------------------------------------------------------------------
# Generation compared with references
# ------------------------------------------------------------------------------------------
def generation_examples(records: list[dict[str, Any]], tokenizer: Tokenizer, format: str = "auto",
                        prompt_template: str | None = None,
                        reference_field: str | None = None) -> list[tuple[list[int], str]]:
    """``(prompt ids, reference)`` per record: through :func:`prompt_and_reference` (chat, alpaca,
    prompt/completion records), or with ``prompt_template`` (``str.format`` over the record's fields,
    e.g. ``"{document}\\nSubject:"``) and the reference from ``reference_field``."""
    if (prompt_template is None) != (reference_field is None):
        raise ConfigError("prompt_template and reference_field go together: give both or neither")
    examples = []
    if prompt_template is not None:
        head = prompt_head(tokenizer)
        for number, record in enumerate(records, 1):
            try:
                prompt = prompt_template.format_map(record)
            except (KeyError, IndexError, ValueError) as exc:
                raise DataError(f"record {number}: prompt_template {prompt_template!r} does not fit the record's "
                                f"fields {sorted(record)}: {exc!r}") from None
            reference = _text(record.get(reference_field), f"field {reference_field!r}", number)
            examples.append((head + tokenizer.encode(prompt), reference))
        return examples
    fmt = record_format(records, format)
    for number, record in enumerate(records, 1):
        try:
            examples.append(prompt_and_reference(record, fmt, tokenizer))
        except DataError as exc:
            raise DataError(f"record {number}: {exc}") from None
    return examples


def generation_metrics(model: torch.nn.Module, tokenizer: Tokenizer, examples: Sequence[tuple[Sequence[int], str]],
                       sampling: SamplingConfig | None = None, batch_size: int = 16, progress: Any = None,
                       **options: Any) -> tuple[dict[str, float], list[Completion]]:
    """Generate from each example's prompt ids (greedy unless ``sampling``/``options`` say otherwise)
    and compare with its reference: ``bleu``, ``chrf``, ``rouge1``, ``rouge2``, ``rougeL`` (0-100),
    ``eos_rate`` and ``mean_new_tokens``. Works on a bare model and tokenizer (a training loop's
    model is put in eval mode for the call and restored). Returns the metrics and the generations."""
    if not examples:
        raise DataError("no examples to generate for")
    if sampling is None:
        options.setdefault("temperature", 0.0)
    config = SamplingConfig.from_options(sampling, **options)
    if config.num_samples != 1:
        raise ConfigError("the generation task compares one generation per example with its reference; "
                          "num_samples must be 1")
    generations = complete_ids(model, tokenizer, [p for p, _ in examples], config, batch_size, progress)
    hypotheses = [g.text.strip() for g in generations]
    references = [r.strip() for _, r in examples]
    results = {"bleu": M.bleu(hypotheses, references), "chrf": M.chrf(hypotheses, references),
               **M.rouge(hypotheses, references),
               "eos_rate": sum(g.eos for g in generations) / len(generations),
               "mean_new_tokens": sum(len(g.token_ids) for g in generations) / len(generations)}
    return results, generations


def run_generation(lm: LanguageModel, data: DataPaths, *, limit: int | None = None, progress: bool = True,
                   format: str = "auto", prompt_template: str | None = None, reference_field: str | None = None,
                   batch_size: int = 16, beam_size: int = 1, mbr: str | None = None,
                   **sampling: Any) -> dict[str, Any]:
    """Generate for fine-tuning records and compare with their references (see
    :func:`generation_metrics`); ``sampling`` holds :class:`SamplingConfig` fields (default greedy,
    ``max_new_tokens`` 128). An encoder-decoder reads source/target records or two parallel text
    files (sources, then targets) and may decode with ``beam_size`` > 1, and choose among the beam's
    hypotheses by minimum Bayes risk with ``mbr`` (``"bleu"`` or ``"chrf"``)."""
    if getattr(lm, "kind", "causal_lm") == "seq2seq":
        return _run_seq2seq(lm, data, limit, progress, batch_size, beam_size,
                            {**sampling, **({"mbr": mbr} if mbr else {})})
    if beam_size != 1 or mbr:
        raise ConfigError(f"{'beam_size' if beam_size != 1 else 'mbr'} is for encoder-decoder checkpoints")
    records = _limited(_records(data, "generation"), limit)
    config = SamplingConfig.from_options(None, **{"temperature": 0.0, **sampling})  # checked before the slow part
    examples = generation_examples(records, lm.tokenizer, format, prompt_template, reference_field)
    with progress_bar(len(examples), "eval generation", unit="example", enabled=progress) as bar:
        results, generations = generation_metrics(lm.model, lm.tokenizer, examples, config, batch_size, bar)
    samples = [{"prediction": g.text, "reference": ref, "finish_reason": g.finish_reason}
               for g, (_, ref) in zip(generations[:SAMPLES_IN_REPORT], examples)]
    return {"examples": len(examples), "metrics": results,
            "truncated": sum(g.prompt_truncated > 0 for g in generations), "samples": samples}


def _run_seq2seq(lm: LanguageModel, data: DataPaths, limit: int | None, progress: bool, batch_size: int,
                 beam_size: int, sampling: dict[str, Any]) -> dict[str, Any]:
    paths = data_paths(data)
    if len(paths) not in (1, 2):
        raise DataError("give source/target records (one JSON(L) file) or two parallel text files (sources, targets)")
    pairs = _limited(read_pairs(paths[0], paths[1] if len(paths) == 2 else None), limit)
    options = {"max_new_tokens": 128, **sampling}
    if beam_size > 1:
        options["beam_size"] = beam_size
    hypotheses = []
    with progress_bar(len(pairs), "eval generation", unit="example", enabled=progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = [source for source, _ in pairs[start:start + batch_size]]
            hypotheses += lm.generate(chunk, **options)
            bar.update(len(chunk))
    references = [target.strip() for _, target in pairs]
    results = {"bleu": M.bleu(hypotheses, references), "chrf": M.chrf(hypotheses, references),
               **M.rouge(hypotheses, references)}
    samples = [{"source": s[:200], "prediction": h, "reference": r}
               for (s, _), h, r in zip(pairs[:SAMPLES_IN_REPORT], hypotheses, references)]
    return {"examples": len(pairs), "metrics": results, "samples": samples}


# ------------------------------------------------------------------------------------------
# Question answering
# ------------------------------------------------------------------------------------------
def qa_answers(record: dict[str, Any], number: int) -> list[str]:
    """Gold answers of a SQuAD-style record: ``answers`` as ``{"text": [...]}``, a list or a string."""
    answers = record.get("answers")
    if isinstance(answers, dict):
        answers = answers.get("text")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"record {number}: 'answers' must be {{\"text\": [...]}} or a non-empty list of strings")
    return answers


def run_qa(lm: LanguageModel, data: DataPaths, *, limit: int | None = None, progress: bool = True,
           template: str = QA_TEMPLATE, batch_size: int = 16, **sampling: Any) -> dict[str, Any]:
    """Extractive QA by generation: SQuAD ``exact_match`` and ``f1`` (0-100). Greedy, up to 32 new
    tokens, stopping at a newline, unless ``sampling`` says otherwise."""
    records = _limited(_records(data, "qa"), limit)
    if getattr(lm, "kind", "causal_lm") == "qa":  # an extractive model: best spans over context windows
        if sampling or template != QA_TEMPLATE:
            raise ConfigError("an extractive QA checkpoint takes no template or sampling options")
        examples = [(_text(r.get("question"), "'question'", n), _text(r.get("context"), "'context'", n),
                     qa_answers(r, n)) for n, r in enumerate(records, 1)]
        answers = lm.answer([q for q, _, _ in examples], [c for _, c, _ in examples])
        predictions = [a.text for a in answers]
        gold = [g for _, _, g in examples]
        samples = [{"question": q, "prediction": p, "answers": g}
                   for (q, _, g), p in zip(examples[:SAMPLES_IN_REPORT], predictions)]
        return {"examples": len(examples), "metrics": M.squad_scores(predictions, gold), "truncated": 0,
                "samples": samples}
    config = SamplingConfig.from_options(None, **{"temperature": 0.0, "max_new_tokens": 32, "stop": ["\n"],
                                                  **sampling})
    if config.num_samples != 1:
        raise ConfigError("the qa task generates one answer per question; num_samples must be 1")
    context_length = lm.model.config.block_size
    budget = context_length - min(config.max_new_tokens, context_length // 2)
    prompts, gold, truncated = [], [], 0
    for number, record in enumerate(records, 1):
        context = _text(record.get("context"), "'context'", number)
        question = _text(record.get("question"), "'question'", number)
        ids, dropped = qa_prompt(lm.tokenizer, context, question, budget, template)
        prompts.append(ids)
        truncated += dropped > 0
        gold.append(qa_answers(record, number))
    with progress_bar(len(prompts), "eval qa", unit="question", enabled=progress) as bar:
        generations = complete_ids(lm.model, lm.tokenizer, prompts, config, batch_size, bar)
    predictions = [g.text.strip() for g in generations]
    samples = [{"question": r["question"], "prediction": p, "answers": a}
               for r, p, a in zip(records[:SAMPLES_IN_REPORT], predictions, gold)]
    return {"examples": len(prompts), "metrics": M.squad_scores(predictions, gold), "truncated": truncated,
            "samples": samples}


# ------------------------------------------------------------------------------------------
# Zero-shot classification by label likelihood
# ------------------------------------------------------------------------------------------
def run_classification(lm: LanguageModel, data: DataPaths, *, limit: int | None = None, progress: bool = True,
                       labels: Sequence[str] | None = None, label_names: dict[Any, str] | None = None,
                       text_field: FieldName | Sequence[FieldName] | None = None, label_field: FieldName = "label",
                       template: str = CLASSIFICATION_TEMPLATE, normalize: bool = False) -> dict[str, Any]:
    """Zero-shot classification: the candidate label with the highest :func:`label_scores` wins.

    Candidates are ``labels`` or else the distinct labels of the data (sorted). ``label_names``
    maps the data's label values to the words that are scored (``{0: negative, 1: positive}``);
    metrics and reports then use those words."""
    paths = data_paths(data)
    if not paths:
        raise DataError("the classification task needs a data file")
    pairs = _limited([p for path in paths for p in read_labelled(path, text_field, label_field)], limit)
    if label_names is not None:
        if not isinstance(label_names, dict) or not label_names:
            raise ConfigError("label_names must map the data's label values to label words")
        names = {str(k).strip(): str(v) for k, v in label_names.items()}
        unknown = sorted({label for _, label in pairs if label not in names})
        if unknown:
            raise DataError(f"label_names has no name for the label(s) {', '.join(unknown[:5])}")
        pairs = [(text, names[label]) for text, label in pairs]
    gold = [label for _, label in pairs]
    if labels is not None:
        if isinstance(labels, str) or not labels:
            raise ConfigError("labels must be a non-empty list of label words")
        candidates = [str(label) for label in labels]
        missing = sorted(set(gold) - set(candidates))
        if missing:
            raise DataError(f"the data has label(s) {', '.join(missing[:5])} that are not among the candidate "
                            f"labels {candidates}")
    elif getattr(lm, "kind", "causal_lm") == "classification":
        candidates = list(lm.task["labels"])
    else:
        candidates = sorted(set(gold))
    if getattr(lm, "kind", "causal_lm") == "classification":
        unknown = sorted(set(gold) - set(candidates))
        if unknown:
            raise DataError(f"the data has label(s) {', '.join(unknown[:5])} that the classifier does not know "
                            f"(its labels: {', '.join(candidates)})")
        texts = [text for text, _ in pairs]
        predictions = [c.label for c in lm.classify(texts, labels=candidates)]
        samples = [{"text": t[:200], "prediction": p, "label": g}
                   for t, p, g in zip(texts[:SAMPLES_IN_REPORT], predictions, gold)]
        return {"examples": len(texts),
                "metrics": {"accuracy": M.accuracy(predictions, gold), "macro_f1": M.macro_f1(predictions, gold)},
                "labels": candidates, "truncated": 0, "samples": samples}
    if len(candidates) < 2:
        raise DataError(f"classification needs at least two candidate labels, got {candidates}")
    texts = [text for text, _ in pairs]
    with progress_bar(len(texts) * len(candidates), "eval classification", unit="score", enabled=progress) as bar:
        scores, truncated = label_logprobs(lm.model, lm.tokenizer, texts, candidates, template, normalize, bar)
    predictions = [candidates[k] for k in scores.argmax(-1).tolist()]
    samples = [{"text": t[:200], "prediction": p, "label": g}
               for t, p, g in zip(texts[:SAMPLES_IN_REPORT], predictions, gold)]
    return {"examples": len(texts),
            "metrics": {"accuracy": M.accuracy(predictions, gold), "macro_f1": M.macro_f1(predictions, gold)},
            "labels": candidates, "truncated": truncated, "samples": samples}


# ------------------------------------------------------------------------------------------
# Diversity of open-ended generation
# ------------------------------------------------------------------------------------------
def read_prompts(data: DataPaths, tokenizer: Tokenizer) -> list[list[int]]:
    """Prompt ids from files: plain text, one prompt per non-empty line; JSON(L) records with a
    ``prompt`` or ``text`` field, or chat/alpaca records (their conversation up to the last answer)."""
    prompts = []
    for path in data_paths(data):
        if path.suffix not in (".jsonl", ".json"):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text: {exc}") from None
            prompts += [encode_prompt(tokenizer, line) for line in lines if line.strip()]
            continue
        for number, record in enumerate(read_records(path), 1):
            if "prompt" in record or "text" in record:
                field = "prompt" if "prompt" in record else "text"
                prompts.append(encode_prompt(tokenizer, _text(record[field], f"field {field!r}", number)))
            else:
                try:
                    prompts.append(prompt_and_reference(record, record_format([record]), tokenizer)[0])
                except DataError as exc:
                    raise DataError(f"{path}, record {number}: {exc}") from None
    return prompts


def run_diversity(lm: LanguageModel, data: DataPaths = None, *, limit: int | None = None, progress: bool = True,
                  num_samples: int = 32, batch_size: int = 16, **sampling: Any) -> dict[str, Any]:
    """Sample ``num_samples`` continuations (temperature 1, seed 0, up to 64 new tokens unless
    ``sampling`` says otherwise) from the prompts in ``data`` taken in turn, or from the empty prompt
    without data; report ``distinct_1``, ``distinct_2``, ``vocabulary_coverage`` (over the generated
    token ids), ``self_bleu`` and ``mean_new_tokens``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ConfigError(f"the diversity task needs num_samples >= 2, not {num_samples!r}")
    config = SamplingConfig.from_options(None, **{"temperature": 1.0, "seed": 0, "max_new_tokens": 64, **sampling})
    if config.num_samples != 1:
        raise ConfigError("give the diversity task's sample count as num_samples")
    prompts = _limited(read_prompts(data, lm.tokenizer), limit) if data is not None else [[]]
    if not prompts:
        raise DataError("the diversity prompts file holds no prompts")
    rows = [prompts[k % len(prompts)] for k in range(num_samples)]
    with progress_bar(len(rows), "eval diversity", unit="sample", enabled=progress) as bar:
        generations = complete_ids(lm.model, lm.tokenizer, rows, config, batch_size, bar)
    texts = [g.text for g in generations]
    ids = [g.token_ids for g in generations]
    results = {"distinct_1": M.distinct_n(texts, 1), "distinct_2": M.distinct_n(texts, 2),
               "self_bleu": M.self_bleu(texts),
               "vocabulary_coverage": M.vocabulary_coverage(ids, lm.tokenizer.vocab_size),
               "mean_new_tokens": sum(map(len, ids)) / len(ids)}
    return {"examples": len(generations), "metrics": results, "prompts": len(prompts),
            "samples": [{"text": t} for t in texts[:SAMPLES_IN_REPORT]]}


# ------------------------------------------------------------------------------------------
# Dispatch, tables, reports
# ------------------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "perplexity": run_perplexity, "generation": run_generation, "qa": run_qa,
    "classification": run_classification, "diversity": run_diversity,
}
_SAMPLING_FIELDS = tuple(SamplingConfig.__dataclass_fields__)


def task_options(task: str) -> tuple[str, ...]:
    """The options a task takes (beside ``data``, ``limit`` and ``progress``)."""
    runner = _runner(task)
    names = []
    for name, parameter in inspect.signature(runner).parameters.items():
        if name in ("lm", "data", "limit", "progress"):
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            # one generation per example (diversity counts its samples with its own num_samples)
            names += [f for f in _SAMPLING_FIELDS if f not in names and f != "num_samples"]
        else:
            names.append(name)
    return tuple(names)


def check_options(task: str, options: dict[str, Any]) -> None:
    """Raise ConfigError for an option the task does not take, or a value of the wrong type."""
    import difflib

    allowed = task_options(task)
    for name, value in options.items():
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"the {task} task has no option {name!r}{hint}; its options: {', '.join(allowed)}")
        check_option_type(task, name, value)


def _runner(task: str) -> Callable[..., dict[str, Any]]:
    if task not in RUNNERS:
        raise ConfigError(f"unknown evaluation task {task!r}; tasks: {', '.join(TASKS)}")
    return RUNNERS[task]


def check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a whole number >= 1, not {limit!r}")
    return limit


def _data_repr(data: DataPaths) -> str | list[str] | None:
    if data is None or isinstance(data, (str, Path)):
        return None if data is None else str(data)
    return [str(p) for p in data]


def evaluate(lm: LanguageModel, task: str, data: DataPaths = None, limit: int | None = None, progress: bool = True,
             **options: Any) -> dict[str, Any]:
    """Run one task (:data:`TASKS`) on ``data`` (a file or a list of files; the first ``limit``
    records) and return its report ``{"task", "data", "examples", "metrics", "seconds", ...}``
    (plus task extras such as ``truncated``, ``labels`` and a few ``samples``). ``options`` are the
    task's own (see :func:`task_options`); ``None`` values are ignored."""
    runner = _runner(task)
    options = {k: v for k, v in options.items() if v is not None}
    check_options(task, options)
    limit = check_limit(limit)
    started = time.perf_counter()
    result = runner(lm, data, limit=limit, progress=progress, **options)
    seconds = time.perf_counter() - started
    report = {"task": task, "data": _data_repr(data), "examples": result.pop("examples"),
              "metrics": result.pop("metrics"), "seconds": round(seconds, 3)}
    if options:
        report["options"] = options
    report.update(result)
    return report


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.2f}"


def _data_label(data: Any) -> str:
    if data is None:
        return "-"
    items = [data] if isinstance(data, str) else list(data)
    return ", ".join(Path(p).name for p in items)


def format_table(reports: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of reports: one row per metric."""
    header = ("task", "data", "examples", "metric", "value")
    rows: list[tuple[str, ...]] = []
    for report in reports:
        first = (str(report.get("name") or report["task"]), _data_label(report.get("data")),
                 f"{report.get('examples', 0):,}")
        for k, (metric, value) in enumerate(report["metrics"].items()):
            rows.append((*(first if k == 0 else ("", "", "")), metric, _format_value(value)))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    right = {2, 4}

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def write_report(path: str | Path, reports: Sequence[dict[str, Any]], **extra: Any) -> Path:
    """Write ``{"lmforge_version", **extra, "reports": [...]}`` as JSON to ``path``, atomically."""
    check_output_file(path)
    document = {"lmforge_version": __version__, **extra, "reports": list(reports)}
    atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")
    return Path(path)

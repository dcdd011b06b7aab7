"""Task data for the task models: labelled texts, source/target pairs and SQuAD-style questions,
read from the user's files, encoded to token ids and collated into batches.

Formats (``lmforge finetune --task ...``):

    classification   CSV/TSV/JSON(L) with a text column (``text`` or ``sentence``, or named) and a
                     label column (``label``, or a ``labels`` list for multi-label data)
    seq2seq          two parallel text files (one example per line), or JSON(L) records with a
                     source and a target field (source/target, document/summary, src/tgt, input/output)
    qa               SQuAD-style JSON(L): {context, question, answers: {text: [...], answer_start: [...]}}

Every text is encoded the same way for training and for inference (:func:`encode_text`,
:func:`encode_source`), so what a model learns is what the API feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.data.formats import IGNORE, read_records
from lmforge.data.labelled import FieldName, read_labelled
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

TASKS = ("classification", "qa", "seq2seq")
PAIR_FIELDS = (("source", "target"), ("document", "summary"), ("src", "tgt"), ("input", "output"),
               ("text", "summary"))


def _start_id(tokenizer: Tokenizer) -> int:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.start_ids[0]


def _end_id(tokenizer: Tokenizer) -> int:
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.start_ids[0]


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id used to pad batches (pad, else eos, else 0)."""
    for value in (tokenizer.pad_id, tokenizer.eos_id):
        if value is not None:
            return value
    return 0


def detect_task(records: list[dict[str, Any]]) -> str | None:
    """The task a JSON data set is for, from the fields of its first record (None: not a task format)."""
    first = records[0] if records else {}
    if "image" in first:
        return "vqa" if "question" in first else "caption"
    if "audio" in first:
        return "transcribe"
    if "video" in first:
        return "describe"
    if "question" in first and "context" in first:
        return "qa"
    if any(a in first and b in first for a, b in PAIR_FIELDS):
        return "seq2seq"
    if ("text" in first or "sentence" in first) and ("label" in first or "labels" in first):
        return "classification"
    return None


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------
def encode_text(tokenizer: Tokenizer, text: str, max_length: int) -> list[int]:
    """``bos + text + eos`` in at most ``max_length`` tokens (a long text keeps its start). An encoder
    pools the first token (bos stands for BERT's CLS), a causal model the last (eos)."""
    return [_start_id(tokenizer)] + tokenizer.encode(text)[:max_length - 2] + [_end_id(tokenizer)]


@dataclass
class LabelledSet:
    """Texts with their labels: an index per text (single-label) or a set of indices (multi-label)."""

    texts: list[str]
    targets: list[Any]        # int, or tuple of ints for multi-label data
    labels: list[str]         # the label vocabulary, in index order
    multi_label: bool


def read_labelled_set(path: str | Path, text_field: FieldName | list[FieldName] | None = None,
                      label_field: FieldName = "label", multi_label: bool | None = None,
                      labels: list[str] | None = None) -> LabelledSet:
    """A classification data file with its label vocabulary (``labels``, or the sorted labels found).
    ``multi_label=None`` means: multi-label when the labels are JSON lists."""
    if multi_label is None:
        multi_label = _has_list_labels(path, label_field)
    pairs = read_labelled(path, text_field, label_field, multi_label=multi_label)
    found = sorted({x for _, label in pairs for x in (label if multi_label else (label,))})
    vocabulary = list(labels) if labels is not None else found
    index = {label: i for i, label in enumerate(vocabulary)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise DataError(f"{path} has label(s) {', '.join(unknown[:5])} that the model does not know "
                        f"(its labels: {', '.join(vocabulary[:10])})")
    if len(vocabulary) < (1 if multi_label else 2):
        raise DataError(f"{path}: classification needs at least two labels, found {vocabulary}")
    targets = [tuple(index[x] for x in label) if multi_label else index[label] for _, label in pairs]
    return LabelledSet([text for text, _ in pairs], targets, vocabulary, multi_label)


def _has_list_labels(path: str | Path, label_field: FieldName) -> bool:
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        return False
    first = read_records(path)[0]
    value = first.get(label_field, first.get("labels")) if label_field == "label" else first.get(label_field)
    return isinstance(value, list)


def encode_labelled(data: LabelledSet, tokenizer: Tokenizer, max_length: int) -> list[tuple[list[int], Any]]:
    """Rows ``(ids, target)`` for :func:`collate_classification`; multi-label targets become 0/1 lists."""
    rows = []
    for text, target in zip(data.texts, data.targets):
        if data.multi_label:
            target = [1.0 if i in target else 0.0 for i in range(len(data.labels))]
        rows.append((encode_text(tokenizer, text, max_length), target))
    return rows


def pad_rows(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) ids and the (B, T) bool mask of real tokens."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, :len(sequence)] = True
    return ids, mask


def collate_classification(rows: list[tuple[list[int], Any]], pad_id: int) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` (B, T) and ``labels``: (B,) class indices, or (B, L) 0/1 floats."""
    ids, mask = pad_rows([r[0] for r in rows], pad_id)
    targets = [r[1] for r in rows]
    labels = torch.tensor(targets, dtype=torch.float32 if isinstance(targets[0], list) else torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------
# Sequence to sequence
# ------------------------------------------------------------------------------------------
def read_pairs(path: str | Path, target_path: str | Path | None = None, source_field: str | None = None,
               target_field: str | None = None) -> list[tuple[str, str]]:
    """``(source, target)`` texts: line ``i`` of two parallel text files, or two fields of JSON records
    (given, or the first of :data:`PAIR_FIELDS` that the records have)."""
    if target_path is not None:
        sources, targets = (_lines(p) for p in (path, target_path))
        if len(sources) != len(targets):
            raise DataError(f"{path} has {len(sources)} lines but {target_path} has {len(targets)}: parallel files "
                            f"need one line per example in both")
        return list(zip(sources, targets))
    records = read_records(path)
    if source_field is None or target_field is None:
        fields = next(((a, b) for a, b in PAIR_FIELDS if a in records[0] and b in records[0]), None)
        if fields is None:
            raise DataError(f"{path}: cannot find source and target fields in {sorted(records[0])}; expected one of "
                            f"{', '.join(f'{a}/{b}' for a, b in PAIR_FIELDS)}, or give a target file")
        source_field, target_field = source_field or fields[0], target_field or fields[1]
    pairs = []
    for number, record in enumerate(records, 1):
        source, target = record.get(source_field), record.get(target_field)
        if not isinstance(source, str) or not isinstance(target, str):
            raise DataError(f"{path}, record {number}: {source_field!r} and {target_field!r} must be text")
        pairs.append((source, target))
    return pairs


def _lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    if not lines:
        raise DataError(f"{path} holds no examples")
    return lines


def encode_source(tokenizer: Tokenizer, text: str, max_length: int) -> list[int]:
    """Encoder input: ``text + eos`` in at most ``max_length`` tokens (a long text keeps its start)."""
    return tokenizer.encode(text)[:max_length - 1] + [_end_id(tokenizer)]


def encode_pairs(pairs: list[tuple[str, str]], tokenizer: Tokenizer,
                 max_length: int) -> list[tuple[list[int], list[int]]]:
    """Rows ``(source ids + eos, target ids)``; targets are cut to leave room for bos/eos."""
    sources = tokenizer.encode_batch([s for s, _ in pairs])
    targets = tokenizer.encode_batch([t for _, t in pairs])
    end = _end_id(tokenizer)
    return [(source[:max_length - 1] + [end], target[:max_length - 1]) for source, target in zip(sources, targets)]


def collate_pairs(rows: list[tuple[list[int], list[int]]], pad_id: int, bos_id: int, eos_id: int) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` (B, S) sources; ``decoder_input_ids`` (B, T) = bos + target and
    ``labels`` (B, T) = target + eos (``IGNORE`` on padding)."""
    ids, mask = pad_rows([source for source, _ in rows], pad_id)
    decoder_ids, decoder_mask = pad_rows([[bos_id] + target for _, target in rows], pad_id)
    labels, _ = pad_rows([target + [eos_id] for _, target in rows], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
            "labels": labels.masked_fill(~decoder_mask, IGNORE)}


# ------------------------------------------------------------------------------------------
# Extractive question answering
# ------------------------------------------------------------------------------------------
@dataclass
class QAExample:
    """A question about a context, with its gold answers and their character offsets."""

    question: str
    context: str
    answers: list[str]
    starts: list[int]
    title: str | None = None


def read_qa(path: str | Path) -> list[QAExample]:
    """SQuAD-style records. ``answers`` is ``{"text": [...], "answer_start": [...]}`` (a missing start
    is found as the first occurrence of the answer); every answer must occur in its context."""
    examples = []
    for number, record in enumerate(read_records(path), 1):
        context, question = record.get("context"), record.get("question")
        if not isinstance(context, str) or not isinstance(question, str):
            raise DataError(f"{path}, record {number}: 'context' and 'question' must be text")
        answers = record.get("answers")
        texts = answers.get("text") if isinstance(answers, dict) else answers
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise DataError(f"{path}, record {number}: 'answers' must be {{\"text\": [...], \"answer_start\": [...]}}")
        starts = answers.get("answer_start") if isinstance(answers, dict) else None
        if not isinstance(starts, list) or len(starts) != len(texts):
            starts = [context.find(text) for text in texts]
        for text, start in zip(texts, starts):
            if not isinstance(start, int) or start < 0 or context[start:start + len(text)] != text:
                raise DataError(f"{path}, record {number}: the answer {text[:40]!r} is not in the context at "
                                f"{start}")
        title = record.get("title")
        examples.append(QAExample(question, context, list(texts), list(starts), title if isinstance(title, str)
                                  else None))
    return examples

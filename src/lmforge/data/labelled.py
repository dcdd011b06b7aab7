"""Labelled texts (classification data): JSON(L), CSV or TSV files with a text and a label column."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.data.formats import read_records
from lmforge.errors import ConfigError, DataError


def _text(value: Any, what: str, number: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"record {number}: {what} must be text, not {type(value).__name__}")
    return value


FieldName = str | int


def read_labelled(path: str | Path, text_field: FieldName | Sequence[FieldName] | None = None,
                  label_field: FieldName = "label", multi_label: bool = False) -> list[tuple[str, Any]]:
    """``(text, label)`` pairs of a JSON(L), CSV or TSV file; labels as strings.

    With ``multi_label`` each label is a tuple of strings: a JSON list, or (CSV/TSV, JSON strings)
    labels separated by ``|``; an empty list means no label applies. The label column defaults to
    ``label``, else ``labels``.

    Columns are found by name in JSON records and in the header row of CSV/TSV files; the text
    column defaults to ``text``, else ``sentence``. For files without a header give the columns as
    0-based numbers. Several text columns (a list) are joined with a space (e.g. title + body).
    """
    path = Path(path)
    fields = list(text_field) if isinstance(text_field, (list, tuple)) else [text_field]
    numbered = any(isinstance(f, int) for f in [*fields, label_field])
    if numbered and not all(isinstance(f, int) for f in [*fields, label_field]):
        raise ConfigError("give text_field and label_field either both as column names (files with a header) "
                          "or both as 0-based column numbers (files without one)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        try:
            with open(path, encoding="utf-8", newline="") as f:
                if suffix == ".tsv":
                    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
                else:
                    rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        rows = [row for row in rows if row]
        if not rows:
            raise DataError(f"{path} holds no examples")
        if numbered:  # no header: columns by position
            table = rows
            columns = {i: i for i in range(max(len(r) for r in rows))}
        else:
            header, table = rows[0], rows[1:]
            columns = {name: i for i, name in enumerate(header)}
        records: list[dict[Any, Any]] = [{key: row[i] for key, i in columns.items() if i < len(row)}
                                         for row in table]
        where = f"the columns of {path} ({', '.join(map(str, columns))})"
    else:
        records = read_records(path)
        if numbered:
            raise DataError(f"{path}: JSON records name their fields; column numbers are for CSV/TSV files")
        where = f"the records of {path}"
    if not records:
        raise DataError(f"{path} holds no examples")
    first = records[0]
    if fields == [None]:
        found = next((name for name in ("text", "sentence") if name in first), None)
        if found is None:
            raise DataError(f"no text column (text or sentence) in {where}; set text_field (a name, or a "
                            f"0-based column number for files without a header)")
        fields = [found]
    if label_field == "label" and "label" not in first and "labels" in first:
        label_field = "labels"
    for name in [*fields, label_field]:
        if name not in first:
            raise DataError(f"no column {name!r} in {where}; set text_field/label_field (names, or 0-based "
                            f"column numbers for files without a header)")
    pairs = []
    for number, record in enumerate(records, 1):
        if any(name not in record for name in [*fields, label_field]):
            raise DataError(f"{path}, example {number}: missing a text or label column")
        text = " ".join(_text(record[name], f"column {name!r}", number) for name in fields)
        label = record[label_field]
        if multi_label:
            items = label.split("|") if isinstance(label, str) else label
            if not isinstance(items, list) or any(item is None or isinstance(item, (dict, list)) for item in items):
                raise DataError(f"{path}, example {number}: multi-label labels must be a list of strings or "
                                f"'a|b' text, not {label!r}")
            pairs.append((text, tuple(sorted({str(item).strip() for item in items if str(item).strip()}))))
            continue
        if label is None or isinstance(label, (dict, list)):
            hint = " (a list of labels: use multi-label classification)" if isinstance(label, list) else ""
            raise DataError(f"{path}, example {number}: the label must be a string or number, not {label!r}{hint}")
        pairs.append((text, str(label).strip()))
    return pairs

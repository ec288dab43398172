"""A fine-tuning task's files, read into examples: texts, labels, and what the labels mean.

Files as people have them, chosen by their ending:

  .tsv           GLUE's own layout: tab-separated, a header row, no quoting (a quote is text); CoLA's
                 train.tsv and dev.tsv have no header, so a GLUE task may name its columns instead
  .csv           comma-separated with a header row, quoted as spreadsheets and `csv` write it
  .jsonl, .json  one JSON object per line

Each example has one text or a pair (`--text_fields premise hypothesis`) and a label (`--label_field`).
Without `--text_fields` the first of a few usual column names that the header holds is taken
(`DEFAULT_TEXT_FIELDS`). Labels are strings or integers (classification: each distinct value is a class,
ids in sorted order, kept in the checkpoint) or numbers with a decimal point (regression). Every
mistake in a file is one sentence naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from encoder_train.errors import UserError

LAYOUTS = (".tsv", ".csv", ".jsonl", ".json")

# Tried in this order when --text_fields is not given: pairs first, then single texts.
DEFAULT_TEXT_FIELDS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text_a", "text_b"),
    ("sentence",),
    ("text",),
)
DEFAULT_LABEL_FIELD = "label"

Kind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    """How to read a task's files; from a GLUE task (glue.py) or from the command line."""

    text_fields: tuple[str, ...] | None = None
    """One column, or two for a sentence pair; None: the first of DEFAULT_TEXT_FIELDS the file has."""
    label_field: str | None = None
    """The label column; None: DEFAULT_LABEL_FIELD."""
    kind: Kind | None = None
    """classification or regression; None: from the labels (a number with a decimal point: regression)."""
    labels: tuple[str, ...] | None = None
    """A fixed label order (GLUE's); None: the training labels, sorted (numerically for integers)."""
    columns: tuple[str, ...] | None = None
    """Column names of a .tsv without a header row (GLUE's CoLA); a file whose first row holds the label
    column's name is still read as having a header."""


@dataclass(frozen=True)
class Labels:
    """What the model's outputs mean: one logit per class, or one number."""

    kind: Kind
    names: tuple[str, ...] = ()  # classification: the class of each id

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names)}


@dataclass
class Split:
    """One file's examples. `labels` are class ids or numbers; None for a file without labels (a test set)."""

    path: Path
    texts: list[tuple[str, ...]]
    labels: list[int] | list[float] | None
    ids: list[str]  # the `index`/`idx`/`id` column where there is one, else 0, 1, ...: for predictions

    @property
    def name(self) -> str:
        """`dev_matched.tsv` -> matched, `validation.jsonl` -> validation: names a split's metrics."""
        stem = self.path.name.split(".")[0]
        for prefix in ("dev_", "validation_", "val_", "test_"):
            if stem.startswith(prefix) and len(stem) > len(prefix):
                return stem[len(prefix):]
        return stem


@dataclass
class Task:
    """A task ready to train on: the splits, the label space, and the columns that were read."""

    train: Split
    validation: list[Split]
    test: Split | None
    labels: Labels
    text_fields: tuple[str, ...]
    label_field: str
    name: str | None = None  # a GLUE task's name


# ---- reading ----------------------------------------------------------------------------------------------


@dataclass
class Records:
    """A file's rows as {column: value}, with their line numbers (1 = the first line of the file)."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]


def read_records(path: str | Path, flag: str, columns: tuple[str, ...] | None = None,
                 header_names: tuple[str, ...] = (), limit: int | None = None,
                 keep: tuple[str, ...] | None = None) -> Records:
    """Read a .tsv, .csv or .jsonl file; `flag` is the option that named it (for messages). With `columns`, a
    table whose first row holds none of `header_names` has no header: that row is an example (CoLA).
    `limit`: stop after that many examples (a header is all some callers need). `keep`: the columns to keep
    in each row (MNLI's training file holds 12, and 393,000 rows)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a .tsv, .csv or .jsonl file.")
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist; pass a .tsv, .csv or .jsonl file.")
    suffix = path.suffix.lower()
    if suffix not in LAYOUTS:
        raise UserError(f"{flag} {path} is not a .tsv, .csv or .jsonl file; rename it after its layout "
                        "(tab-separated: .tsv, comma-separated: .csv, one JSON object per line: .jsonl).")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix in (".jsonl", ".json"):
                return _read_jsonl(path, itertools.islice(f, limit), keep)
            return _read_table(path, f, suffix, columns, header_names, limit, keep)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8 (e.g. with iconv).") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check the file and its permissions.") from None


# A field may be a whole document: Python's default cap of 128 KB per field would refuse it. Texts are cut to
# the model's length later; only memory bounds a field here.
FIELD_LIMIT = 2**31 - 1


def _read_table(path: Path, f, suffix: str, columns: tuple[str, ...] | None, header_names: tuple[str, ...],
                limit: int | None, keep: tuple[str, ...] | None) -> Records:
    csv.field_size_limit(FIELD_LIMIT)
    # GLUE's TSVs are not quoted: a " is part of the text (SST-2, MNLI), so quoting is off for .tsv.
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv.reader(f)
    try:
        return _parse_table(path, reader, suffix, columns, header_names, limit, keep)
    except csv.Error as e:  # a NUL byte, a quote left open at the end of the file, ...
        raise UserError(f"{path} line {reader.line_num} cannot be read as a {suffix} table ({e}); fix that line, "
                        "or save the data as .jsonl.") from None


def _parse_table(path: Path, reader, suffix: str, columns: tuple[str, ...] | None, header_names: tuple[str, ...],
                 limit: int | None, keep: tuple[str, ...] | None) -> Records:
    first = next(reader, None)
    if first is None:
        raise UserError(f"{path} is empty; it needs a header row and at least one example.")
    if columns is not None and not set(header_names) & set(first):
        header, body = list(columns), [first]  # a headerless file (CoLA): the first row is an example
    else:
        header, body = first, []
    if len(set(header)) != len(header):
        twice = sorted({c for c in header if header.count(c) > 1})
        raise UserError(f"{path}: the header names column {twice[0]!r} twice; give each column its own name.")
    wanted = [(i, c) for i, c in enumerate(header) if keep is None or c in keep]
    rows = []
    # A row's number is the line it ends on (a quoted CSV field may hold line breaks).
    numbered = itertools.chain([(1, r) for r in body], ((reader.line_num, r) for r in reader))
    for number, values in itertools.islice(numbered, limit):
        if not any(v.strip() for v in values):
            continue  # a blank line
        if len(values) != len(header):
            raise UserError(
                f"{path} line {number} has {len(values)} fields but the header has {len(header)} "
                f"({', '.join(header)}); fix that line" + (" (a tab inside a text?)." if suffix == ".tsv" else ".")
            )
        rows.append((number, {c: values[i] for i, c in wanted}))
    return Records(path, header, rows)


def _read_jsonl(path: Path, f, keep: tuple[str, ...] | None) -> Records:
    rows, columns = [], {}
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({e.msg}); each line must be one JSON object "
                            'such as {"text": "...", "label": "..."}.') from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object; each line must be one object such as "
                            '{"text": "...", "label": "..."}.')
        columns.update(dict.fromkeys(record))
        rows.append((number, record if keep is None else {k: record[k] for k in keep if k in record}))
    return Records(path, list(columns), rows)


# ---- columns --------------------------------------------------------------------------------------------


def resolve_fields(records: Records, spec: TaskSpec, flag: str) -> tuple[tuple[str, ...], str]:
    """The text column(s) and the label column of the training file, refusing what it lacks."""
    have = set(records.columns)
    label = spec.label_field or DEFAULT_LABEL_FIELD
    if spec.text_fields is not None:
        missing = [c for c in (*spec.text_fields, label) if c not in have]
        if missing:
            raise UserError(
                f"{flag} {records.path} has no column {missing[0]!r} (its columns: {_listed(records.columns)}); "
                "name the text columns with --text_fields and the label column with --label_field."
            )
        return spec.text_fields, label
    texts = next((c for c in DEFAULT_TEXT_FIELDS if set(c) <= have), None)
    if texts is None:
        usual = ", ".join("/".join(c) for c in DEFAULT_TEXT_FIELDS)
        raise UserError(
            f"{flag} {records.path} has none of the usual text columns ({usual}); its columns are "
            f"{_listed(records.columns)}: name the text column(s) with --text_fields."
        )
    if label not in have:
        raise UserError(f"{flag} {records.path} has no label column {label!r} (its columns: "
                        f"{_listed(records.columns)}); name it with --label_field.")
    return texts, label


def _listed(columns: list[str]) -> str:
    shown = ", ".join(repr(c) for c in columns[:12])
    return shown + (", ..." if len(columns) > 12 else "") if columns else "none"


def _texts(records: Records, fields: tuple[str, ...], flag: str) -> list[tuple[str, ...]]:
    out = []
    for number, row in records.rows:
        texts = []
        for column in fields:
            value = row.get(column)
            if value is None:
                raise UserError(f"{flag} {records.path} line {number} has no {column!r}; every example needs its "
                                "text (an empty string is allowed).")
            if isinstance(value, dict | list):
                raise UserError(f"{flag} {records.path} line {number}: {column!r} is not text; give it as a string.")
            texts.append(value if isinstance(value, str) else json.dumps(value))
        out.append(tuple(texts))
    return out


ID_COLUMNS = ("index", "idx", "id")


def _ids(records: Records) -> list[str]:
    """Each example's id in predictions files: the file's own `index`/`idx`/`id` column, else its position among
    the examples from 0, as GLUE's submission files number them (never the line number)."""
    column = next((c for c in ID_COLUMNS if c in records.columns), None)
    return [str(row.get(column, i)) if column else str(i) for i, (_, row) in enumerate(records.rows)]


# ---- labels ---------------------------------------------------------------------------------------------

# A label's type: "int" (an integer, or text that is one), "float" (a number with a fraction or exponent), "str".


def _label_value(value: Any) -> tuple[str, Any] | None:
    """(type, value) of a raw label; None when it is missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "str", str(value).lower()
    if isinstance(value, int):
        return "int", value
    if isinstance(value, float):
        return ("float", value) if math.isfinite(value) else ("str", str(value))
    text = str(value).strip()
    if not text:
        return None
    try:
        return "int", int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return "str", text
    return ("float", number) if math.isfinite(number) else ("str", text)


def _raw_labels(records: Records, label: str, flag: str, required: bool = True) -> list[tuple[int, str, Any]] | None:
    """(line, type, value) of every row's label; None when the label is optional and absent from the file."""
    if not required and label not in records.columns:
        return None
    out = []
    for number, row in records.rows:
        typed = _label_value(row.get(label))
        if typed is None:
            raise UserError(f"{flag} {records.path} line {number} has no label in column {label!r}; give every "
                            "example a label, or remove the line.")
        out.append((number, *typed))
    return out


def _check_types(raw: list[tuple[int, str, Any]], path: Path, label: str, flag: str) -> set[str]:
    types = {t for _, t, _ in raw}
    if "str" in types and len(types) > 1:
        text = next(r for r in raw if r[1] == "str")
        number = next(r for r in raw if r[1] != "str")
        raise UserError(
            f"{flag} {path}: column {label!r} mixes text and number labels (line {text[0]}: {text[2]!r}, "
            f"line {number[0]}: {number[2]!r}); use one kind of label throughout."
        )
    return types


def label_space(raw: list[tuple[int, str, Any]], spec: TaskSpec, path: Path, label: str, flag: str) -> Labels:
    """The labels the training file defines: the classes and their ids, or regression."""
    types = _check_types(raw, path, label, flag)
    kind = spec.kind or ("regression" if "float" in types else "classification")
    if kind == "regression":
        if "str" in types:
            line, _, value = next(r for r in raw if r[1] == "str")
            raise UserError(f"{flag} {path} line {line}: label {value!r} is not a number, and this task is a "
                            "regression; give every label as a number.")
        return Labels("regression")
    if "float" in types:
        line, _, value = next(r for r in raw if r[1] == "float")
        raise UserError(f"{flag} {path} line {line}: label {value!r} has a fraction, and this task is a "
                        "classification; give classes as integers or names.")
    seen = sorted({v for _, _, v in raw})  # integers numerically, names alphabetically
    names = tuple(str(v) for v in seen)
    if spec.labels is not None:
        unknown = [n for n in names if n not in spec.labels]
        if unknown:
            line = next(r[0] for r in raw if str(r[2]) == unknown[0])
            raise UserError(f"{flag} {path} line {line}: label {unknown[0]!r} is not one of this task's labels "
                            f"({', '.join(spec.labels)}); check the --label_field column.")
        names = spec.labels
    if len(seen) < 2:
        raise UserError(f"{flag} {path}: every example has the label {names[0]!r}; a classifier needs examples of "
                        "at least two labels.")
    return Labels("classification", names)


def encode_labels(raw: list[tuple[int, str, Any]], labels: Labels, path: Path, flag: str, train_path: Path,
                  label: str) -> list[int] | list[float]:
    """Class ids or numbers; a class the training file never had, or a type that differs, is refused."""
    types = _check_types(raw, path, label, flag)
    if labels.kind == "regression":
        if "str" in types:
            line, _, value = next(r for r in raw if r[1] == "str")
            raise UserError(f"{flag} {path} line {line}: label {value!r} is not a number, but the training labels "
                            f"of {train_path} are; give every label as a number.")
        return [float(v) for _, _, v in raw]
    ids = {name: i for i, name in enumerate(labels.names)}
    out = []
    for line, kind, value in raw:
        name = str(value)
        if kind == "float" or name not in ids:
            raise UserError(
                f"{flag} {path} line {line}: label {value!r} never occurs in the training file {train_path} "
                f"(its labels: {', '.join(labels.names)}); fix the label, or add examples of it to the training file."
            )
        out.append(ids[name])
    return out


# ---- a task ---------------------------------------------------------------------------------------------


def load_task(train_file: str | Path, validation_files: list[str | Path], test_file: str | Path | None = None,
              spec: TaskSpec = TaskSpec(), name: str | None = None) -> Task:
    """Read and check every split; the training file decides the columns and the labels."""
    markers = (*(spec.text_fields or ()), spec.label_field or DEFAULT_LABEL_FIELD)  # words of a header row
    first = read_records(train_file, "--train_file", spec.columns, markers, limit=1)
    _not_empty(first, "--train_file")
    text_fields, label = resolve_fields(first, spec, "--train_file")
    keep = (*text_fields, label, *ID_COLUMNS)
    train_records = read_records(train_file, "--train_file", spec.columns, markers, keep=keep)
    raw = _raw_labels(train_records, label, "--train_file")
    labels = label_space(raw, spec, train_records.path, label, "--train_file")
    train = Split(train_records.path, _texts(train_records, text_fields, "--train_file"),
                  encode_labels(raw, labels, train_records.path, "--train_file", train_records.path, label),
                  _ids(train_records))

    def split(path: str | Path, flag: str, required: bool) -> Split:
        records = read_records(path, flag, spec.columns, (*text_fields, label), keep=keep)
        missing = [c for c in text_fields if c not in records.columns]
        if missing:
            raise UserError(f"{flag} {records.path} has no column {missing[0]!r}, which the training file "
                            f"{train.path} has (its columns: {_listed(records.columns)}); give it the same columns.")
        if required and label not in records.columns:
            raise UserError(f"{flag} {records.path} has no label column {label!r} (its columns: "
                            f"{_listed(records.columns)}); give it the training file's columns.")
        _not_empty(records, flag)
        found = _raw_labels(records, label, flag, required)
        ids = None if found is None else encode_labels(found, labels, records.path, flag, train.path, label)
        return Split(records.path, _texts(records, text_fields, flag), ids, _ids(records))

    if not validation_files:
        raise UserError("no validation file was given; pass --validation_file (the best epoch is chosen on it).")
    validation = [split(p, "--validation_file", True) for p in validation_files]
    names = [s.name for s in validation]
    if len(set(names)) != len(names):
        raise UserError(f"two --validation_file files have the name {names[0]!r}; give each its own file name.")
    test = split(test_file, "--test_file", False) if test_file is not None else None
    return Task(train, validation, test, labels, text_fields, label, name)


def _not_empty(records: Records, flag: str) -> None:
    if not records.rows:
        raise UserError(f"{flag} {records.path} holds no examples; pass a file with at least one row"
                        + (" below its header." if records.path.suffix.lower() in (".tsv", ".csv") else "."))

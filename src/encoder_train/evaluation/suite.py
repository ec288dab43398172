"""A suite YAML -> a checked list of TaskConfig.

    tasks:
      heldout:                       # the task's name: a column group of the report
        kind: mlm                    # kinds.KINDS
        data_dir: shards/val         # the kind's keys (its Settings dataclass), max_length among them
        reference: {loss: 2.1}       # optional: published values, a reference row in report.md
        reference_source: "the paper, table 3"

The suite is read whole and every task's keys are checked against its kind's Settings (unknown keys, missing
required keys, wrong types: one sentence naming the suite file, the task and the key, with the allowed keys), then
each kind reads its task's files (`check`), all before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from encoder_train.errors import UserError
from encoder_train.evaluation.kinds import KINDS, kind_module
from encoder_train.evaluation.spec import TaskConfig
from encoder_train.urls import credentials_refusal, is_url, local_only

TASK_KEYS = ("kind", "reference", "reference_source")  # beside the kind's own keys
YAML_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # task and model names become folder names


@dataclass(frozen=True)
class Suite:
    path: Path
    tasks: list[TaskConfig]


def load_suite(path: str | Path, check_files: bool = True) -> Suite:
    """Read, check and resolve a suite; then every task's kind checks its files (unless `check_files` is False: a
    suite whose data is not downloaded yet, read for its keys alone)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"suite {path} does not exist; pass --suite with a suite YAML file (a `tasks:` mapping).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"suite {path} is not valid YAML ({first}); fix the file.") from None
    if not isinstance(data, dict) or "tasks" not in data:
        raise UserError(f"suite {path} has no `tasks:` mapping; write `tasks: {{NAME: {{kind: ..., ...}}}}`.")
    extra = sorted(str(k) for k in data if k != "tasks")
    if extra:
        raise UserError(f"suite {path} has the unknown top-level key {extra[0]!r}{_close(extra[0], ['tasks'])}; "
                        "a suite holds only `tasks:`.")
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise UserError(f"suite {path}: `tasks` must map task names to their settings and name at least one task.")
    configs = [_task(path, name, body) for name, body in tasks.items()]
    for task in configs if check_files else ():
        try:
            kind_module(task.kind).check(task)
        except UserError as e:
            where = f"suite {path}, task {task.name}"
            raise (e if str(path) in str(e) else UserError(f"{where}: {e}")) from None
    return Suite(path, configs)


def _task(path: Path, name: Any, body: Any) -> TaskConfig:
    if not isinstance(name, str) or not PLAIN_NAME.match(name):
        raise UserError(f"suite {path}: task name {name!r} is not a plain name; use letters, digits, '.', '_' and "
                        "'-' (it names the report's rows and a folder).")
    where = f"suite {path}, task {name}"
    if not isinstance(body, dict):
        raise UserError(f"{where}: the task must be a mapping of keys (kind: ..., ...), not {body!r}.")
    kind = body.get("kind")
    if kind is None:
        raise UserError(f"{where} has no `kind`; add one of: {', '.join(KINDS)}.")
    if kind not in KINDS:
        raise UserError(f"{where}: kind {kind!r} is unknown{_close(str(kind), list(KINDS))}; use one of: "
                        f"{', '.join(KINDS)}.")
    try:
        module = kind_module(kind)
    except ModuleNotFoundError as e:
        if e.name != KINDS[kind]:
            raise
        raise UserError(f"{where}: kind {kind} is not part of this version of encoder-train; use one of the others "
                        "or update encoder-train.") from None
    keys = {k: v for k, v in body.items() if k not in TASK_KEYS}
    settings = build_settings(module.Settings, keys, where, path.parent)
    reference = body.get("reference") or {}
    numbers = isinstance(reference, dict) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in reference.items())
    if not numbers:
        raise UserError(f"{where}: reference must map metric names to numbers (reference: {{accuracy: 0.87}}), "
                        f"not {reference!r}.")
    source = body.get("reference_source")
    if source is not None and not isinstance(source, str):
        raise UserError(f"{where}: reference_source must be a text (where the reference values come from), "
                        f"not {source!r}.")
    return TaskConfig(name, kind, settings, path, {k: float(v) for k, v in reference.items()}, source)


def build_settings(cls: type, given: dict[str, Any], where: str, folder: Path) -> Any:
    """`cls(**given)` with every key known, every required key present and every value of its field's type;
    paths resolved against `folder`. A Settings' own checks (`__post_init__`) may add their sentence."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "max_length" not in fields:  # our bug: the contract of every kind (spec.py)
        raise TypeError(f"{cls.__module__}.{cls.__name__} lacks max_length")
    hints = typing.get_type_hints(cls)
    allowed = sorted([*fields, *TASK_KEYS])
    for key in given:
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}{_close(str(key), allowed)}; the keys of this kind are: "
                            f"{', '.join(allowed)}.")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in given]
    if missing:
        raise UserError(f"{where} lacks the required key {missing[0]!r}; add it (required: {', '.join(required)}).")
    values = {}
    for key, value in given.items():
        hint, field = hints[key], fields[key]
        ok, converted = _convert(value, hint)
        if not ok:
            raise UserError(f"{where}: {key} must be {describe(hint)}, not {value!r}; fix the value.")
        values[key] = _resolve(converted, field, folder, where, key)
    try:
        return cls(**values)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether `value` is of type `hint`, the value as the field holds it: an int as a float, a list as a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:  # in order: `int | list[int]` tries the int first
            ok, converted = _convert(value, arm)
            if ok:
                return True, converted
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is typing.Literal:
        return value in args, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str) and YAML_FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-5 (no dot) as a text
            return True, float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if hint is Path:  # kept as given until _resolve: Path() would turn s3://b into s3:/b
        return isinstance(value, str) and value != "", _PathText(value) if isinstance(value, str) else None
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False, None
        arm = args[0] if args else Any
        items = [_convert(v, arm) for v in value]
        if not all(ok for ok, _ in items):
            return False, None
        converted = [v for _, v in items]
        return True, tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            return False, None
        pairs = {k: _convert(v, args[1]) for k, v in value.items()}
        ok = all(isinstance(k, str) for k in value) and all(ok for ok, _ in pairs.values())
        return ok, {k: v for k, (_, v) in pairs.items()} if ok else None
    raise TypeError(f"settings type {hint!r} is not one a suite can give")  # our bug: see spec.py


def describe(hint: Any) -> str:
    """`int | list[int]` -> 'an integer or a list of integers'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of names to {_plural(args[1])}"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a text",
            Path: "a path"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "texts", Path: "paths", bool: "booleans"}.get(hint, describe(hint))


def _resolve(value: Any, field: dataclasses.Field, folder: Path, where: str, key: str) -> Any:
    """A relative path against the suite's folder; a URL only in a LOCATION field."""
    if isinstance(value, _PathText):
        why = local_only(str(value))
        if why:
            raise UserError(f"{where}: {key} {value} {why}.")
        return Path(value) if Path(value).is_absolute() else folder / value
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, field, folder, where, key) for v in value)
    if isinstance(value, str) and field.metadata.get("location"):
        refused = credentials_refusal(value, key, where)
        if refused:
            raise UserError(refused)
        return value if is_url(value) or Path(value).is_absolute() else str(folder / value)
    return value


class _PathText(str):
    """A Path field's value as the suite wrote it, until it is resolved."""


def _close(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""

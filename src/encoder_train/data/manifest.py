"""The shard manifest: one small `manifest.json` at the root of a folder (or bucket prefix) of shards, written by
`encoder-train pretokenize` once all of its tasks are done, that lists every shard with what a reader needs of it.

With it, `train` builds each shard's `ShardInfo` from one read of the manifest instead of one header read per
shard (at 100,000 objects in a bucket, on every rank, that is minutes of requests before the first step), and
checks the folder's listing against it (`check_listing`): a shard missing, unlisted or of another size is refused.

The file (paths relative to the folder the manifest lies in; URLs never carry credentials):

    {"format": "encoder-train shard manifest", "version": 1, "num_tasks": 3, "seq_len": 512, "text_field": "text",
     "tokenizer": {"vocab_size": 50265, "sha256": "..."},
     "folders": {"train": "train", "val": "val"},
     "inputs": [{"path": "s3://bucket/raw/a.jsonl.zst", "bytes": 1234567, "task": 0}],
     "shards": [{"path": "train/00000-000000.pt", "task": 0, "rows": 8192, "width": 512, "dtype": "int32",
                 "offset": 832, "row_stride": 512, "bytes": 16778000, "tokens": 4190000, "sha256": "...",
                 "inputs": [0, 3]}],
     "totals": {"documents": 0, "input_bytes": 0, "rows": 0, "tokens": 0, "shards": 0}}

`rows, width, dtype, offset, row_stride` are the fields of `ShardInfo` that a `.pt` shard's header gives (`dtype`
is the torch dtype's name without `torch.`), `bytes` the object's size, `tokens` its non-pad tokens, `inputs`
indices into "inputs" of the files whose text it holds. Reading is strict: anything malformed is one UserError
naming the manifest, never a half-read manifest.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from encoder_train.data.formats.base import ID_DTYPES, ObjectStore, ShardInfo, check_width
from encoder_train.errors import UserError
from encoder_train.urls import has_credentials, is_url

NAME = "manifest.json"
FORMAT = "encoder-train shard manifest"
VERSION = 1

# The dtype names a manifest may give ("int32"), as the torch dtypes a shard may hold.
DTYPES = {str(d).removeprefix("torch."): d for d in ID_DTYPES}


@dataclass(frozen=True)
class TokenizerEntry:
    vocab_size: int
    sha256: str  # of the tokenizer.json bytes the shards were made with


@dataclass(frozen=True)
class InputEntry:
    path: str  # a local path or a URL (without credentials), as given to pretokenize
    bytes: int
    task: int  # the task that read it


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the manifest's folder, `/`-separated
    task: int
    rows: int
    width: int
    dtype: str  # a key of DTYPES
    offset: int  # where row 0's ids start in the file, in bytes
    row_stride: int  # elements between the starts of consecutive rows
    bytes: int  # the file's size
    tokens: int  # non-pad tokens
    sha256: str  # of the file's bytes
    inputs: tuple[int, ...]  # indices into Manifest.inputs


@dataclass(frozen=True)
class Totals:
    documents: int
    input_bytes: int
    rows: int
    tokens: int
    shards: int


@dataclass(frozen=True)
class Manifest:
    num_tasks: int
    seq_len: int
    text_field: str
    tokenizer: TokenizerEntry
    folders: dict[str, str]  # split -> folder under the manifest's folder: {"train": "train", "val": "val"}
    inputs: tuple[InputEntry, ...]
    shards: tuple[ShardEntry, ...]
    totals: Totals

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **asdict(self)}
        for s in body["shards"]:
            s["inputs"] = list(s["inputs"])
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """The manifest in `text`, read from `where` (named in every message)."""
        return _Reader(where).manifest(text)


def shard_info(entry: ShardEntry, root: str, store: ObjectStore | None, max_tokens: int) -> ShardInfo:
    """The ShardInfo a header read of the shard would give, from its entry alone (no byte of the shard is read).
    `root`: the folder the manifest lies in, a path or a URL; `store`: None for a local folder."""
    path = root.rstrip("/") + "/" + entry.path if store is not None else posixpath.join(root, entry.path)
    check_width(path, entry.width, max_tokens)
    return ShardInfo(path, entry.rows, entry.width, DTYPES[entry.dtype], entry.offset, entry.row_stride, store)


@dataclass(frozen=True)
class Differences:
    """Where a listing of the shards disagrees with the manifest, by path relative to the manifest's folder."""

    missing: list[str]  # in the manifest, not listed
    unlisted: list[str]  # listed, not in the manifest
    resized: list[tuple[str, int, int]]  # (path, bytes in the manifest, bytes listed)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unlisted or self.resized)

    def describe(self, limit: int = 3) -> str:
        """The differences as a clause: `shard train/1.pt is missing, shard train/2.pt has 10 bytes (the manifest
        says 12), and 4 more`."""
        parts = ([f"shard {p} is missing" for p in self.missing]
                 + [f"shard {p} has {got:,} bytes (the manifest says {want:,})" for p, want, got in self.resized]
                 + [f"{p} is not in the manifest" for p in self.unlisted])
        shown = parts[:limit]
        if len(parts) > limit:
            shown.append(f"{len(parts) - limit} more")
        return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def check_listing(manifest: Manifest, listed: list[tuple[str, int]], folder: str = "") -> Differences:
    """Compare a listing (path relative to the manifest's folder, size in bytes) with the manifest's shards.
    `folder`: only the shards under this folder of the manifest's (`train`) are expected in the listing; "" for all.
    """
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    expected = {s.path: s.bytes for s in manifest.shards if s.path.startswith(prefix)}
    found = dict(listed)
    return Differences(
        missing=sorted(p for p in expected if p not in found),
        unlisted=sorted(p for p in found if p not in expected),
        resized=sorted((p, expected[p], size) for p, size in found.items() if p in expected and expected[p] != size),
    )


class _Reader:
    """Strict parsing: every key present and of its type, nothing unknown, every index and path sound."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> UserError:
        return UserError(f"manifest {self.where} is malformed ({what}); re-create it with `encoder-train pretokenize` "
                         "(finished tasks are skipped), or remove it to read the shards' own headers.")

    def manifest(self, text: str | bytes) -> Manifest:
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise self.fail(f"not JSON: {e}") from None
        if not isinstance(body, dict):
            raise self.fail("not a JSON object")
        if body.get("format") != FORMAT:
            raise self.fail(f'"format" is {body.get("format")!r}, not {FORMAT!r}')
        if body.get("version") != VERSION:
            raise self.fail(f'"version" is {body.get("version")!r}; this encoder-train reads version {VERSION}')
        body = {k: v for k, v in body.items() if k not in ("format", "version")}
        self.keys(body, Manifest, "the manifest")
        inputs = tuple(InputEntry(**self.record(e, InputEntry, f"inputs[{i}]"))
                       for i, e in enumerate(self.list(body["inputs"], "inputs")))
        shards = tuple(self.shard(e, i, len(inputs)) for i, e in enumerate(self.list(body["shards"], "shards")))
        paths = [s.path for s in shards]
        if len(set(paths)) != len(paths):
            twice = sorted({p for p in paths if paths.count(p) > 1})[0]
            raise self.fail(f"shard {twice} is listed twice")
        folders = body["folders"]
        if not isinstance(folders, dict) or not all(isinstance(k, str) and isinstance(v, str) and _relative(v)
                                                   for k, v in folders.items()):
            raise self.fail('"folders" must map split names to relative folder names')
        manifest = Manifest(
            num_tasks=self.count(body["num_tasks"], "num_tasks", least=1),
            seq_len=self.count(body["seq_len"], "seq_len", least=1),
            text_field=self.text(body["text_field"], "text_field"),
            tokenizer=TokenizerEntry(**self.record(body["tokenizer"], TokenizerEntry, "tokenizer")),
            folders=dict(folders),
            inputs=inputs,
            shards=shards,
            totals=Totals(**self.record(body["totals"], Totals, "totals")),
        )
        for s in shards:
            if s.task >= manifest.num_tasks:
                raise self.fail(f"shard {s.path} names task {s.task} of {manifest.num_tasks}")
        return manifest

    def shard(self, raw: Any, i: int, inputs: int) -> ShardEntry:
        values = self.record(raw, ShardEntry, f"shards[{i}]")
        where = f"shards[{i}]"
        if not _relative(values["path"]):
            raise self.fail(f"{where}.path {values['path']!r} is not a relative path inside the manifest's folder")
        if values["dtype"] not in DTYPES:
            raise self.fail(f"{where}.dtype {values['dtype']!r} is not one of {', '.join(DTYPES)}")
        for key in ("rows", "width", "row_stride"):
            if values[key] < 1:
                raise self.fail(f"{where}.{key} is {values[key]}, not a count >= 1")
        if values["row_stride"] < values["width"]:
            raise self.fail(f"{where}.row_stride {values['row_stride']} is less than its width {values['width']}")
        itemsize = DTYPES[values["dtype"]].itemsize
        end = values["offset"] + ((values["rows"] - 1) * values["row_stride"] + values["width"]) * itemsize
        if end > values["bytes"]:
            raise self.fail(f"{where}: its rows end at byte {end:,}, past its {values['bytes']:,} bytes")
        if not all(0 <= k < inputs for k in values["inputs"]):
            raise self.fail(f"{where}.inputs holds an index outside the {inputs} inputs")
        return ShardEntry(**{**values, "inputs": tuple(values["inputs"])})

    def record(self, raw: Any, cls: type, where: str) -> dict[str, Any]:
        """The fields of `cls` from the JSON object `raw`, each checked against its annotation."""
        self.keys(raw, cls, where)
        values = {}
        for f in fields(cls):
            name, value = f"{where}.{f.name}", raw[f.name]
            if f.type == "int":
                values[f.name] = self.count(value, name)
            elif f.type == "str":
                values[f.name] = self.text(value, name)
            else:  # tuple[int, ...]
                values[f.name] = [self.count(v, name) for v in self.list(value, name)]
        if isinstance(values.get("path"), str) and has_credentials(values["path"]):
            raise self.fail(f"{where}.path carries credentials")
        return values

    def keys(self, raw: Any, cls: type, where: str) -> None:
        if not isinstance(raw, dict):
            raise self.fail(f"{where} is not a JSON object")
        want = {f.name for f in fields(cls)}
        if raw.keys() - want:
            raise self.fail(f"{where} has the unknown key {sorted(raw.keys() - want)[0]!r}")
        if want - raw.keys():
            raise self.fail(f"{where} lacks the key {sorted(want - raw.keys())[0]!r}")

    def list(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise self.fail(f"{where} is not a list")
        return value

    def count(self, value: Any, where: str, least: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise self.fail(f"{where} is {value!r}, not an integer >= {least}")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{where} is {value!r}, not a string")
        return value


def _relative(path: str) -> bool:
    """A `/`-separated path that stays inside its folder: not absolute, not a URL, no `..`, no empty part."""
    parts = path.split("/")
    return bool(path) and not is_url(path) and not path.startswith("/") and "\\" not in path and all(
        p not in ("", ".", "..") for p in parts)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as a manifest names it: torch.int32 -> "int32"."""
    return str(dtype).removeprefix("torch.")

"""The input files `--input` names: paths, local globs, URLs and URL globs, listed once.

`tokenizer` and `pretokenize` take `raw/*.jsonl`, `s3://bucket/raw/**/*.jsonl.zst`, `gs://...`, `hf://...`. Each
glob is expanded once and its matches sorted, so every task of a run (data/tasks.py) sees the same list in the same
order. A remote file is an `ObjectText`: its URL, its size as listed, and ranged reads through the store's fsspec
filesystem (data/store.py: credentials from the protocol library's own environment, AWS_ENDPOINT_URL for an
S3-compatible store; a missing bucket or refused credentials worded there). textfiles.py streams it under the same
bounded readers as a local file.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder_train.data.store import RemoteStore
from encoder_train.errors import UserError
from encoder_train.textfiles import Input
from encoder_train.urls import CREDENTIALS, credentials_refusal, is_remote, local_path, protocol_of

# Bytes of a remote input fetched per ranged request (fsspec's read-ahead block): what one open remote file holds.
REMOTE_READ_BYTES = 8 << 20

# Characters that make an --input a glob.
GLOB_CHARS = re.compile(r"[*?[]")


@dataclass(frozen=True)
class ObjectText:
    """One input object in a bucket (or on the Hub): its URL, its size as listed, and the store that reads it."""

    url: str
    size: int
    store: RemoteStore

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def open(self) -> Any:
        """The object as a read-only binary file: ranged reads of REMOTE_READ_BYTES, read ahead."""
        path = self.store.fs_path(self.url)
        return self.store.retry(f"input file {self.url}",
                                lambda: self.store.fs.open(path, "rb", block_size=REMOTE_READ_BYTES))


def expand_inputs(specs: Sequence[str | Path], flag: str = "--input") -> list[Input]:
    """The input files `specs` name, in order: a path, a local glob (`raw/**/*.jsonl`), a URL or a URL glob
    (`s3://bucket/raw/**/*.jsonl.zst`), each glob's matches sorted. A glob or URL that matches nothing, a missing
    bucket and refused credentials are one sentence each."""
    stores: dict[str, RemoteStore] = {}
    found: list[Input] = []
    for spec in specs:
        text = str(spec)
        if is_remote(text):
            found += _expand_url(text, flag, stores)
        elif GLOB_CHARS.search(text := local_path(text)):
            matches = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{flag} {text} matches no file; check the pattern (** matches any folders below).")
            found += [Path(p) for p in matches]
        else:
            found.append(Path(text))
    return found


def input_name(path: Input) -> str:
    """How the manifest and the plan name an input: its URL, or its absolute local path."""
    return os.path.abspath(path) if isinstance(path, Path) else str(path)


def _expand_url(url: str, flag: str, stores: dict[str, RemoteStore]) -> list[ObjectText]:
    """The objects a URL or URL glob names, sorted by URL, with their sizes (one listing request per glob)."""
    refused = credentials_refusal(url, flag, "the command line")
    if refused:
        raise UserError(refused)
    scheme = protocol_of(url) + "://"
    root = scheme + url[len(scheme):].split("/", 1)[0]  # the bucket
    store = stores.get(root) or stores.setdefault(root, RemoteStore(root, flag))
    path = store.fs_path(url.rstrip("/"))
    is_glob = GLOB_CHARS.search(url) is not None
    listed = store.retry(f"{flag} {url}", lambda: store.fs.glob(path, detail=True) if is_glob
                         else _info_or_none(store.fs, path), listing=True)
    files = sorted((store.url(p), int(info.get("size") or 0)) for p, info in listed.items()
                   if info.get("type", "file") == "file")
    if files:
        return [ObjectText(u, size, store) for u, size in files]
    if not store.retry(f"{flag} {url}", lambda: store.fs.exists(store.fs_path(root)), listing=True):
        where = CREDENTIALS.get(store.protocol, "the storage library's credentials")
        raise UserError(f"{flag} {url}: the bucket {root} does not exist, or these credentials may not see it; "
                        f"check the URL and {where}.")
    what = "matches no object" if is_glob else "is not an object (a folder, or nothing)"
    raise UserError(f"{flag} {url} {what}; check the URL (a folder's objects are named by a glob, e.g. "
                    f"{root}/raw/**/*.jsonl.zst).")


def _info_or_none(fs: Any, path: str) -> dict[str, dict]:
    """{path: info} for one object, {} when there is none."""
    try:
        return {path: fs.info(path)}
    except FileNotFoundError:
        return {}

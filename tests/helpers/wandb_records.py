"""Read what an offline W&B run wrote: the records in its `run-<id>.wandb` file.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-log-format
32 KiB blocks of records (crc32c:4, length:2, type:1, payload), each payload a protobuf `Record`.
Tests use this to check what a real offline run logged, instead of mocking W&B.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The file's records, once complete: W&B's service process may still be writing after `finish()`
    returns (it flushes on its own), so wait for the run's closing `exit` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _parse(Path(path).read_bytes(), path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _parse(data: bytes, path: Path) -> list[wandb_internal_pb2.Record]:
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, records, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer: too small for a record header
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # a record still being written
            break
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
    return records


def run_files(wandb_dir: Path) -> list[Path]:
    return sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))


def history(wandb_dir: Path) -> list[dict]:
    """Every history row logged, over every offline run directory (a resumed run writes a new one)."""
    rows = []
    for f in run_files(wandb_dir):
        for r in read_records(f):
            if r.WhichOneof("record_type") == "history":
                items = r.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


def run_ids(wandb_dir: Path) -> set[str]:
    ids = set()
    for f in run_files(wandb_dir):
        for r in read_records(f):
            if r.WhichOneof("record_type") == "run":
                ids.add(r.run.run_id)
    return ids


def config(wandb_dir: Path) -> dict:
    """The run's config: sent with the run record, and in later config records."""
    out = {}
    for f in run_files(wandb_dir):
        for r in read_records(f):
            kind = r.WhichOneof("record_type")
            updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
            for item in updates:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out

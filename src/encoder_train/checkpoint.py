"""Checkpoints: save, load, find the latest, rotate. Knows nothing of the model, W&B or the loop.

One file per checkpoint, `checkpoint_XXXXXXXX.pt` with the zero-padded optimizer step, holding only
tensors and builtins so that `torch.load(weights_only=True)` reads it. A file is written under a
temporary name in the same folder, flushed, fsynced, then renamed: no partial file ever carries a
checkpoint's name. Old checkpoints are deleted only after the new one is in place. Each checkpoint
carries a digest of its whole content, checked on load: a file damaged after it was written (a bad
disk, a copy cut short) is refused instead of silently resuming from wrong weights.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from encoder_train.errors import UserError

NAME = re.compile(r"^checkpoint_(\d{8,})\.pt$")
TEMPORARY = re.compile(r"^\.checkpoint_\d{8,}\.pt\..*\.tmp$")


def digest(obj: Any) -> str:
    """A hash of a checkpoint's content: every tensor's dtype, shape and bytes, every builtin's repr."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(repr(obj).encode())


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint in `directory`, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def ensure_writable(directory: str | Path) -> Path:
    """Create the folder if needed and prove we can write there, before any training time is spent."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(
            f"checkpoint folder {directory} is not writable ({e.strerror}); pass --checkpoint_dir with a "
            "folder you can write to."
        ) from None
    return directory


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete half-written temporary files left by a run killed while saving (never a named checkpoint)."""
    directory = Path(directory)
    stale = [p for p in directory.iterdir() if TEMPORARY.match(p.name)] if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save(state: dict[str, Any], directory: str | Path, step: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`; returns its path."""
    final = checkpoint_path(directory, step)
    state = {**state, "checksum": digest(state)}
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)  # make the rename itself durable
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints; returns what was deleted."""
    found = list_checkpoints(directory)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU. Refuses pickles that would run code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass --load_checkpoint with a checkpoint file or latest.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"checkpoint {path} holds objects that safe (weights_only) loading refuses; it was not written "
            "by encoder-train and is not loaded."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError):
        raise UserError(
            f"checkpoint {path} is truncated or corrupt; resume from an earlier checkpoint instead."
        ) from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"checkpoint {path} is not an encoder-train checkpoint (no model and step inside).")
    if state.pop("checksum", None) != digest(state):
        raise UserError(
            f"checkpoint {path} fails verification (its content does not match its checksum); "
            "resume from an earlier checkpoint instead."
        )
    return state


def load_latest_good(directory: str | Path, note=print) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads and verifies; newer damaged ones are skipped, and said so."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load(path), path
        except UserError as e:
            note(f"skipping {path.name}: {e}")
    return None

"""Checkpoints: save, load, find the latest, rotate. Knows nothing of the model, W&B or the loop.

Two formats. `single`: one file per checkpoint, `checkpoint_XXXXXXXX.pt` with the zero-padded optimizer step,
holding only tensors and builtins so that `torch.load(weights_only=True)` reads it. `sharded`: one folder,
`checkpoint_XXXXXXXX/`, where every rank wrote its own shards of the model and optimizer with
torch.distributed.checkpoint (DCP), beside `meta.pt` (the rest of the training state, as in a single file) and
`COMPLETE.json` (every file's size), written last: the folder is written as `.checkpoint_XXXXXXXX.partial/` and
renamed only once every rank has finished, so a folder with the checkpoint's name is always complete, and the
sizes tell a shard lost or cut short afterwards. Every command reads both formats (`load`).

For a single file: A file is written under a
temporary name in the same folder, flushed, fsynced, then renamed: no partial file ever carries a
checkpoint's name. Old checkpoints are deleted only after the new one is in place. Each checkpoint
carries a digest of its whole content, checked on load: a file damaged after it was written (a bad
disk, a copy cut short) is refused instead of silently resuming from wrong weights.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from encoder_train.errors import UserError

NAME = re.compile(r"^checkpoint_(\d{8,})\.pt$")
FOLDER = re.compile(r"^checkpoint_(\d{8,})$")
TEMPORARY = re.compile(r"^\.checkpoint_\d{8,}(\.pt\..*\.tmp|\.partial|\.replaced)$")
MARKER, META = "COMPLETE.json", "meta.pt"  # in a sharded checkpoint's folder


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


def folder_path(directory: str | Path, step: int) -> Path:
    """Where the sharded checkpoint of `step` goes."""
    return Path(directory) / f"checkpoint_{step:08d}"


def partial_path(directory: str | Path, step: int) -> Path:
    """Where every rank writes the sharded checkpoint of `step` before it is complete (the same path on every node)."""
    return Path(directory) / f".checkpoint_{step:08d}.partial"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `directory`, files and sharded folders, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name)) and p.is_file()]
    found += [(int(m.group(1)), p) for p in directory.iterdir()
              if (m := FOLDER.match(p.name)) and p.is_dir() and (p / MARKER).exists()]
    return sorted(found)


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint in `directory`, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def ensure_writable(directory: str | Path) -> Path:
    """Create the folder if needed and prove we can write there, before any training time is spent."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--checkpoint_dir {directory} is a file, not a folder; pass a folder (it is created "
                        "if missing).")
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
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which would race
    with the background checkpoint writer); Linux reports it in /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, once, and put back at once
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file made by tempfile (mode 0600) the mode any program's new file gets: 0666 less the umask, so
    that colleagues on a shared cluster can read checkpoints and exports as they can read the user's other files."""
    os.chmod(path, 0o666 & ~_umask())


def save(state: dict[str, Any], directory: str | Path, step: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`; returns its path."""
    return save_as(state, checkpoint_path(directory, step))


def save_as(state: dict[str, Any], final: Path) -> Path:
    """Write `state` atomically, with its checksum, as the file `final`."""
    state = {**state, "checksum": digest(state)}
    try:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(e, final, state) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)  # make the rename itself durable
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError):
            raise _write_error(e, final, state) from None
        raise
    return final


def _write_error(e: OSError | RuntimeError, final: Path, state: dict[str, Any]) -> Exception:
    """A failed write as one sentence when the disk is full or the folder unwritable; else the error itself.

    torch.save reports a full disk as a RuntimeError from its zip writer, without an errno: a write that
    failed while the checkpoint needs more than the free space is taken to be a full disk."""
    needed = _size_of(state)
    free = shutil.disk_usage(final.parent).free  # the half-written file is gone: this is the space it can have
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or needed > free:
        return UserError(
            f"no space left to write checkpoint {final}: it needs about {needed / 1e6:,.1f} MB and "
            f"{free / 1e6:,.1f} MB are free on that disk; free some space and resume with --load_checkpoint latest "
            "(the previous checkpoints are kept)."
        )
    if isinstance(e, OSError):
        return UserError(f"could not write checkpoint {final} ({e.strerror}); the previous checkpoints are kept.")
    return e


def _size_of(obj: Any) -> int:
    """Bytes of tensor data in a checkpoint's state (its file is that plus a little structure)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_size_of(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_size_of(v) for v in obj)
    return len(obj) if isinstance(obj, str | bytes) else 8


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(directory: str | Path, keep: int, kept_steps: frozenset[int] | set[int] = frozenset()) -> list[Path]:
    """Delete all but the `keep` newest checkpoints; returns what was deleted. Those of `kept_steps` (the ends of
    phases) are outside the rotation: never deleted, and not counted among the `keep`."""
    found = [(s, p) for s, p in list_checkpoints(directory) if s not in kept_steps]
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return doomed


def load(path: str | Path, flag: str = "--load_checkpoint", weights: bool = True) -> dict[str, Any]:
    """Read a checkpoint onto the CPU. Refuses pickles that would run code (weights_only).

    `flag` is the command-line flag that named `path` (train's --load_checkpoint, evaluate's --checkpoint,
    ...): the error messages tell the user what to pass to it. A sharded checkpoint is read whole (its shards
    joined) unless `weights` is False: a resume then loads the shards into the model it has built, each rank its
    own (`state.TrainState.load_shards`), and the dict says where they are (`sharded_checkpoint`).
    """
    path = Path(path)
    if path.is_dir() and ((path / MARKER).exists() or (path / META).exists() or (path / ".metadata").exists()):
        return load_sharded(path, flag, weights)
    if path.is_dir():
        newest = latest(path)
        raise UserError(
            f"{flag} {path} is a folder, not a checkpoint file; pass {flag} with a checkpoint file"
            + (f" such as {newest}." if newest else " (checkpoint_XXXXXXXX.pt).")
        )
    if path.exists() and not path.is_file():  # a pipe, a device
        raise UserError(f"{flag} {path} is not a regular file (a pipe or a device); pass {flag} with a checkpoint "
                        "file (checkpoint_XXXXXXXX.pt).")
    if not path.is_file():
        # Only train's flag also takes the word latest.
        also = " or latest" if flag == "--load_checkpoint" else ""
        raise UserError(f"checkpoint {path} does not exist; pass {flag} with a checkpoint file{also}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # random bytes ("Unsupported operand"), not a refused class ("global")
            raise UserError(f"checkpoint {path} is truncated or corrupt (it does not load as a checkpoint); "
                            "resume from an earlier checkpoint instead.") from None
        raise UserError(
            f"checkpoint {path} holds objects that safe (weights_only) loading refuses; it was not written "
            "by encoder-train and is not loaded."
        ) from None
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read (permission denied); make it readable or pass another "
                        f"{flag}.") from None
    except Exception:  # noqa: BLE001 - random bytes or a cut file fail anywhere in the unpickler (IndexError, ...)
        raise UserError(
            f"checkpoint {path} is truncated or corrupt (it does not load as a checkpoint); resume from an earlier "
            "checkpoint instead."
        ) from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"checkpoint {path} is not an encoder-train checkpoint (no model and step inside).")
    if "checksum" not in state:
        raise UserError(
            f"checkpoint {path} carries no checksum, so it cannot be verified: it was not written by this version "
            "of encoder-train (or was re-saved by hand); resume from a checkpoint this version wrote."
        )
    if state.pop("checksum") != digest(state):
        raise UserError(
            f"checkpoint {path} fails verification (its content does not match its checksum); "
            "resume from an earlier checkpoint instead."
        )
    return state


def load_latest_good(directory: str | Path, note=print, weights: bool = True) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads and verifies; newer damaged ones are skipped, and said so."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load(path, weights=weights), path
        except UserError as e:
            note(f"skipping {path.name}: {e}")
    return None


def finish_sharded(partial: Path, final: Path, meta: dict[str, Any]) -> Path:
    """Rank 0, once every rank's shards of `partial` are written: the rest of the training state beside them, the
    marker with every file's size, then the rename that makes the checkpoint. Returns its path."""
    meta = {**meta, "checksum": digest(meta)}
    try:
        with open(partial / META, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
        for name in files:
            follow_umask(partial / name)
        with open(partial / MARKER, "w") as f:
            json.dump({"step": meta["step"], "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(partial / MARKER)
        os.chmod(partial, 0o777 & ~_umask())
        if final.exists():  # a damaged checkpoint of this step, which `latest` skipped: replaced, never merged
            aside = final.with_name(f".{final.name}.replaced")
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(partial, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise _write_error(e, final, meta) from None
    return final


def load_sharded(path: Path, flag: str, weights: bool) -> dict[str, Any]:
    """A sharded checkpoint: verified (every file of the marker there, at its size; meta.pt's checksum), then its
    training state, and with `weights` the model and optimizer joined from every rank's shards."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = dict(marker["files"])
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is an incomplete sharded checkpoint (no {MARKER}: its save did not "
                        "finish); resume from an earlier checkpoint instead.") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint {path} has a damaged {MARKER}; resume from an earlier checkpoint "
                        "instead.") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint {path} lacks {name}, which one of the ranks that wrote it saved (a file lost "
                            "in a copy?); restore it, or resume from an earlier checkpoint.")
        if file.stat().st_size != size:
            raise UserError(f"checkpoint {path}'s file {name} is {file.stat().st_size} bytes where {size} were "
                            "written (cut short or changed); restore it, or resume from an earlier checkpoint.")
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - as a single file's: any unpickling failure is damage
        raise UserError(f"checkpoint {path}'s {META} is truncated or corrupt; resume from an earlier checkpoint "
                        "instead.") from None
    if not isinstance(meta, dict) or meta.pop("checksum", None) != digest(meta):
        raise UserError(f"checkpoint {path}'s {META} fails verification; resume from an earlier checkpoint instead.")
    try:  # the index of every rank's shards: cheap to read, and damage there would fail a resume much later
        from torch.distributed.checkpoint import FileSystemReader

        FileSystemReader(str(path)).read_metadata()
    except Exception:  # noqa: BLE001 - unpickling damaged bytes fails in many ways
        raise UserError(f"checkpoint {path}'s .metadata (the index of its shards) is damaged; resume from an "
                        "earlier checkpoint instead.") from None
    meta["sharded_checkpoint"] = str(path)
    if weights:
        meta |= read_shards(path)
    return meta


def read_shards(path: Path) -> dict[str, Any]:
    """{model, optimizer} of a sharded checkpoint as whole tensors, in this process alone (no torchrun): what
    evaluate, fill-mask, export, fine-tuning and `consolidate` need."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".joining-") as tmp:
        try:
            dcp_to_torch_save(path, Path(tmp) / "whole.pt")
            whole = torch.load(Path(tmp) / "whole.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - DCP reports damaged metadata in many ways
            raise UserError(f"checkpoint {path}'s shards do not load ({type(e).__name__}: {str(e).splitlines()[0]}"
                            "); its .metadata or a shard is damaged: resume from an earlier checkpoint.") from None
    return {"model": whole["model"], "optimizer": whole["optimizer"]}


class FolderLock:
    """An exclusive lock on a checkpoint folder, held for a whole run: one writer per folder.

    Two runs writing one folder (a requeued job whose old copy still runs, a copy-pasted command) would
    interleave their checkpoints and metrics silently. The lock is the operating system's (a POSIX
    record lock on `.encoder-train.lock`, which also works across hosts on NFS), so a run killed by any
    signal, SIGKILL included, releases it with its process: no stale lock to clean up by hand. The file
    itself stays and names the last holder.
    """

    NAME = ".encoder-train.lock"

    def __init__(self, directory: str | Path, flag: str = "--checkpoint_dir"):
        self.path = Path(directory) / self.NAME
        self.flag = flag  # the command-line flag that named the folder, for the messages
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        directory = self.path.parent
        if directory.is_symlink() and not directory.exists():
            raise UserError(f"{self.flag} {directory} is a symbolic link to {os.readlink(directory)}, which does "
                            f"not exist; create that folder, or pass another {self.flag}.")
        if directory.exists() and not directory.is_dir():
            raise UserError(f"{self.flag} {directory} is a file, not a folder; pass a folder (it is created "
                            "if missing).")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"checkpoint folder {self.path.parent} is not writable ({e.strerror}); pass {self.flag} with "
                "a folder you can write to."
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"checkpoint folder {self.path.parent} cannot be locked ({e.strerror}); "
                                "use a folder on a file system that supports locks.") from None
            raise UserError(
                f"checkpoint folder {self.path.parent} is in use by another encoder-train run ({holder}); "
                f"wait for it to finish or stop it, or pass another {self.flag}."
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"process {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"

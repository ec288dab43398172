"""Checkpoints: save, load, find the latest, rotate. Knows nothing of the model, W&B or the loop.

Two formats. `single`: one file per checkpoint, `checkpoint_XXXXXXXX.pt` with the zero-padded optimizer step,
holding only tensors and builtins so that `torch.load(weights_only=True)` reads it. `sharded`: one folder,
`checkpoint_XXXXXXXX/`, where every rank wrote its own shards of the model and optimizer with
torch.distributed.checkpoint (DCP), beside `meta.pt` (the rest of the training state, as in a single file) and
`COMPLETE.json` (every file's size and SHA-256), written last: the folder is written as
`.checkpoint_XXXXXXXX.partial/` and renamed only once every rank has finished, so a folder this program names is
complete, and the sizes and checksums tell a shard lost, cut short or changed afterwards. Every command reads both
formats (`load`), straight from the files (a colleague's read-only folder included).

Nothing here deletes a checkpoint it did not verify or write complete: a damaged or unfinished one that a run
finds where it needs the name is set aside (`set_aside`: renamed out of the checkpoint names, and said so), and
rotation deletes only complete ones.

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
from torch.distributed.checkpoint.api import CheckpointException

from encoder_train.errors import UserError

NAME = re.compile(r"^checkpoint_(\d{8,})\.pt$")
FOLDER = re.compile(r"^checkpoint_(\d{8,})$")
TEMPORARY = re.compile(r"^\.checkpoint_\d{8,}(\.pt\..*\.tmp|\.partial)$")
MARKER, META = "COMPLETE.json", "meta.pt"  # in a sharded checkpoint's folder
# What torch.distributed.checkpoint raises: its CheckpointException derives from BaseException, so a plain
# `except Exception` misses it (and a damaged shard became a traceback).
DCP_ERRORS = (Exception, CheckpointException)


class Damaged(UserError):
    """A checkpoint that does not load or verify (as opposed to one that loads but does not suit the run):
    `latest` skips it and sets it aside."""


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
    """(step, path) of every checkpoint in `directory`, files and sharded folders, oldest first. A folder without
    its marker is listed too (a copy that lost it, a save of another program): it is no checkpoint to resume, but
    it holds shards that nothing may silently delete, so `latest` names it and a fresh run refuses the folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name)) and p.is_file()]
    found += [(int(m.group(1)), p) for p in directory.iterdir() if (m := FOLDER.match(p.name)) and p.is_dir()]
    return sorted(found)


def is_complete(path: Path) -> bool:
    """Whether this program wrote `path` complete: a file only ever gets a checkpoint's name by the rename that ends
    its write, a folder only with its marker, written last."""
    return path.is_file() or (path / MARKER).is_file()


def set_aside(path: Path) -> Path:
    """Rename a damaged or unfinished checkpoint out of the checkpoint names (`checkpoint_00000010.damaged-<time>`),
    beside it: nothing lists, resumes or rotates it any more, and nothing is deleted. Returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():  # two in one second
        aside, n = path.with_name(f"{path.name}.damaged-{stamp}-{n}"), n + 1
    try:
        os.replace(path, aside)
    except OSError as e:
        raise UserError(f"could not set aside the damaged checkpoint {path} ({e.strerror}); move it out of the "
                        "checkpoint folder by hand, then run again.") from None
    return aside


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
        raise write_error(e, final, size_of(state)) from None
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
            raise write_error(e, final, size_of(state)) from None
        raise
    return final


def write_error(e: BaseException, final: Path, needed: int) -> BaseException:
    """A failed write of `needed` bytes as one sentence when the disk is full or the folder unwritable; else the
    error itself. DCP's CheckpointException is looked into: it wraps each rank's own error.

    torch.save reports a full disk as a RuntimeError from its zip writer, without an errno: a write that
    failed while the checkpoint needs more than the free space is taken to be a full disk."""
    cause = _first_failure(e)
    free = shutil.disk_usage(final.parent).free  # the half-written files are gone: this is the space they can have
    code = getattr(cause, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(cause, OSError | RuntimeError) and needed > free):
        return UserError(
            f"no space left to write checkpoint {final}: it needs about {needed / 1e6:,.1f} MB and "
            f"{free / 1e6:,.1f} MB are free on that disk; free some space and resume with --load_checkpoint latest "
            "(the previous checkpoints are kept)."
        )
    if isinstance(cause, OSError):
        return UserError(f"could not write checkpoint {final} ({cause.strerror}); the previous checkpoints are kept.")
    return e


def _first_failure(e: BaseException) -> BaseException:
    """The error inside a CheckpointException (the first failed rank's), else `e`."""
    failures = getattr(e, "failures", None)
    return next(iter(failures.values()))[0] if isinstance(e, CheckpointException) and failures else e


def size_of(obj: Any) -> int:
    """Bytes of tensor data in a checkpoint's state (its file is that plus a little structure); a DTensor counts
    whole (its global shape), so a rank's shards give the size of the whole sharded checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(size_of(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(size_of(v) for v in obj)
    return len(obj) if isinstance(obj, str | bytes) else 8


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(directory: str | Path, keep: int, kept_steps: frozenset[int] | set[int] = frozenset()) -> list[Path]:
    """Delete all but the `keep` newest checkpoints; returns what was deleted. Those of `kept_steps` (the ends of
    phases) are outside the rotation: never deleted, and not counted among the `keep`; a rotating checkpoint older
    than a kept one is deleted too (a resume takes the newer kept one: it is dead weight). Only complete
    checkpoints are deleted: a folder without its marker was not finished by this program and stays."""
    if keep <= 0:
        return []
    complete = [(s, p) for s, p in list_checkpoints(directory) if is_complete(p)]
    newest_kept = max((s for s, _ in complete if s in kept_steps), default=-1)
    rotating = [(s, p) for s, p in complete if s not in kept_steps]
    doomed = [p for i, (s, p) in enumerate(rotating) if i < len(rotating) - keep or s < newest_kept]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return doomed


def load(path: str | Path, flag: str = "--load_checkpoint", weights: bool = True,
         contents: bool = True) -> dict[str, Any]:
    """Read a checkpoint onto the CPU. Refuses pickles that would run code (weights_only).

    `flag` is the command-line flag that named `path` (train's --load_checkpoint, evaluate's --checkpoint,
    ...): the error messages tell the user what to pass to it. A sharded checkpoint is read whole (its shards
    joined) unless `weights` is False: a resume then loads the shards into the model it has built, each rank its
    own (`state.TrainState.load_shards`), and the dict says where they are (`sharded_checkpoint`). Without
    `contents`, a sharded checkpoint's shards are not hashed (another rank verified them already).
    A checkpoint that does not load or verify raises `Damaged`.
    """
    path = Path(path)
    if path.is_dir() and (FOLDER.match(path.name) or any((path / n).exists() for n in (MARKER, META, ".metadata"))):
        return load_sharded(path, flag, weights, contents)
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
            raise Damaged(f"checkpoint {path} is truncated or corrupt (it does not load as a checkpoint); "
                          "resume from an earlier checkpoint instead.") from None
        raise UserError(
            f"checkpoint {path} holds objects that safe (weights_only) loading refuses; it was not written "
            "by encoder-train and is not loaded."
        ) from None
    except PermissionError:
        raise Damaged(f"checkpoint {path} cannot be read (permission denied); make it readable or pass another "
                      f"{flag}.") from None
    except Exception:  # noqa: BLE001 - random bytes or a cut file fail anywhere in the unpickler (IndexError, ...)
        raise Damaged(
            f"checkpoint {path} is truncated or corrupt (it does not load as a checkpoint); resume from an earlier "
            "checkpoint instead."
        ) from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise Damaged(f"checkpoint {path} is not an encoder-train checkpoint (no model and step inside).")
    if "checksum" not in state:
        raise Damaged(
            f"checkpoint {path} carries no checksum, so it cannot be verified: it was not written by this version "
            "of encoder-train (or was re-saved by hand); resume from a checkpoint this version wrote."
        )
    if state.pop("checksum") != digest(state):
        raise Damaged(
            f"checkpoint {path} fails verification (its content does not match its checksum); "
            "resume from an earlier checkpoint instead."
        )
    return state


def load_latest_good(directory: str | Path, note=print, weights: bool = True,
                     aside: bool = False) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads and verifies; newer damaged or unfinished ones are skipped, and said so.
    With `aside` (a run that holds the folder's lock), each skipped one is set aside: the run will need its name."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load(path, weights=weights), path
        except UserError as e:
            note(skipped(path, e, aside))
    return None


def skipped(path: Path, error: Exception, aside: bool) -> str:
    """The sentence for a checkpoint `latest` passes over, once it is set aside when `aside`."""
    where = f"; set aside as {set_aside(path).name}" if aside else ""
    return f"skipping {path.name}{where}: {error}"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (what `sha256sum` prints), read in 4 MiB blocks; hashlib lets go of the GIL
    while it hashes, so a background writer hashing shards barely slows the training thread."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        block = bytearray(4 << 20)
        view = memoryview(block)
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()


def shard_files(folder: Path, rank: int) -> list[Path]:
    """The files rank `rank` wrote into a sharded checkpoint's folder (DCP names them `__<rank>_<n>.distcp`)."""
    return sorted(folder.glob(f"__{rank}_*.distcp"))


def finish_sharded(partial: Path, final: Path, meta: dict[str, Any], sums: dict[str, str]) -> tuple[Path, Path | None]:
    """Rank 0, once every rank's shards of `partial` are written and hashed (`sums`: file name -> SHA-256): the rest
    of the training state beside them, the marker with every file's size and checksum, then the rename that makes
    the checkpoint. Returns its path, and where a checkpoint that already had the name was set aside (or None)."""
    meta = {**meta, "checksum": digest(meta)}
    try:
        with open(partial / META, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
        sums = {name: sums.get(name) or file_sha256(partial / name) for name in files}  # .metadata, meta.pt
        for name in files:
            follow_umask(partial / name)
        with open(partial / MARKER, "w") as f:
            json.dump({"step": meta["step"], "files": files, "sha256": sums}, f)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(partial / MARKER)
        os.chmod(partial, 0o777 & ~_umask())
        aside = set_aside(final) if final.exists() else None  # never merged into, never deleted
        os.replace(partial, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise write_error(e, final, size_of(meta)) from None
    return final, aside


def load_sharded(path: Path, flag: str, weights: bool, contents: bool = True) -> dict[str, Any]:
    """A sharded checkpoint: verified (every file of the marker there, at its size and, with `contents`, its
    checksum; meta.pt's own checksum), then its training state, and with `weights` the model and optimizer joined
    from every rank's shards."""
    files, sums = _read_marker(path)
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise Damaged(f"checkpoint {path} lacks {name}, which one of the ranks that wrote it saved (a file lost "
                          "in a copy?); restore it, or resume from an earlier checkpoint.")
        if file.stat().st_size != size:
            raise Damaged(f"checkpoint {path}'s file {name} is {file.stat().st_size} bytes where {size} were "
                          "written (cut short or changed); restore it, or resume from an earlier checkpoint.")
    for name in files if contents and sums is not None else ():
        _check_content(path, name, sums[name])
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - as a single file's: any unpickling failure is damage
        raise Damaged(f"checkpoint {path}'s {META} is truncated or corrupt; resume from an earlier checkpoint "
                      "instead.") from None
    if not isinstance(meta, dict) or meta.pop("checksum", None) != digest(meta):
        raise Damaged(f"checkpoint {path}'s {META} fails verification; resume from an earlier checkpoint instead.")
    try:  # the index of every rank's shards: cheap to read, and damage there would fail a resume much later
        from torch.distributed.checkpoint import FileSystemReader

        FileSystemReader(str(path)).read_metadata()
    except DCP_ERRORS:  # unpickling damaged bytes fails in many ways
        raise Damaged(f"checkpoint {path}'s .metadata (the index of its shards) is damaged; resume from an "
                      "earlier checkpoint instead.") from None
    meta["sharded_checkpoint"] = str(path)
    if weights:
        meta |= read_shards(path)
    return meta


def _read_marker(path: Path) -> tuple[dict[str, int], dict[str, str] | None]:
    """A sharded checkpoint's marker: {file: size} and {file: SHA-256}; None for the latter in a marker written
    before encoder-train wrote checksums (sizes only: a resume of such a run must still work)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files, sums = dict(marker["files"]), marker.get("sha256")
    except FileNotFoundError:
        raise Damaged(f"checkpoint {path} is an unfinished sharded checkpoint (no {MARKER}: its save did not "
                      "finish, or a copy left the marker out); resume from an earlier checkpoint instead.") from None
    except PermissionError:
        raise Damaged(f"checkpoint {path}'s {MARKER} cannot be read (permission denied); make the folder "
                      "readable, or resume from another checkpoint.") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise Damaged(f"checkpoint {path} has a damaged {MARKER}; resume from an earlier checkpoint "
                      "instead.") from None
    if sums is None:  # written before checksums were: its files are verified by their sizes, as then
        return files, None
    if not isinstance(sums, dict) or set(sums) != set(files):
        raise Damaged(f"checkpoint {path} has a damaged {MARKER} (its checksums do not name every file); resume "
                      "from an earlier checkpoint instead.")
    return files, sums


def _check_content(path: Path, name: str, expected: str) -> None:
    """One file of a sharded checkpoint against the SHA-256 written with it."""
    try:
        found = file_sha256(path / name)
    except OSError as e:
        raise Damaged(f"checkpoint {path}'s file {name} cannot be read ({e.strerror}); make it readable, or resume "
                      "from an earlier checkpoint.") from None
    if found != expected:
        raise Damaged(f"checkpoint {path}'s file {name} does not match the checksum written with it (its bytes "
                      "changed on disk); restore it, or resume from an earlier checkpoint.")


def read_shards(path: Path) -> dict[str, Any]:
    """{model, optimizer} of a sharded checkpoint as whole tensors, in this process alone (no torchrun): what
    evaluate, fill-mask, export, fine-tuning and `consolidate` need. Read straight from the shards into tensors
    shaped from DCP's index (nothing is written, so a read-only folder reads)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Planner(SafeBytes, _EmptyStateDictLoadPlanner):
        pass

    whole: dict[str, Any] = {}
    try:
        # dcp.load keeps only the keys its argument has; an empty dict filled from the index needs the inner
        # loader, as torch's own dcp_to_torch_save does.
        _load_state_dict(whole, storage_reader=FileSystemReader(str(path)), planner=Planner(), no_dist=True)
        return {"model": whole["model"], "optimizer": whole["optimizer"]}
    except DCP_ERRORS as e:  # DCP reports damaged or unreadable shards in many ways
        raise Damaged(f"checkpoint {path}'s shards do not load ({dcp_reason(e)}); its .metadata or a shard is "
                      "damaged or unreadable: resume from an earlier checkpoint.") from None


class SafeBytes:
    """A DCP load planner's mixin: the non-tensor items of a checkpoint (the optimizer's hyperparameters) are
    unpickled with weights_only=True, as every checkpoint read here is (DCP's own planners do not)."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load_planner() -> Any:
    """DCP's default load planner, with `SafeBytes`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(SafeBytes, DefaultLoadPlanner):
        pass

    return Planner()


def dcp_reason(e: BaseException) -> str:
    """The first line of what went wrong inside DCP: a CheckpointException wraps each rank's own error."""
    e = _first_failure(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


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

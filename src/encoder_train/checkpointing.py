"""The run's checkpoints as the loop sees them: which one to resume from, and a writer that saves without stalling
training, in either format (checkpoint.py has the files and folders themselves).

`single`: every rank takes a snapshot (a collective under FSDP, which gathers the whole state), copied to host
memory at once; rank 0 writes it as one file in a background thread. `sharded` (the default under FSDP2 with
several processes): every rank copies its own shards of the model and optimizer to host memory and hands them to
torch.distributed.checkpoint's asynchronous save, which writes them in the background over a process group of its
own (so that its collectives never interleave with training's); rank 0 then writes the rest of the state and the
marker, and renames the folder, once every rank has finished; each rank hashes the files it wrote, in that same
background thread, for the marker's checksums. Either way one save is in flight at most: a save first waits for
the previous one (and raises its error, a full disk say, as one sentence), its failure stops the run at the next
step (the loop's per-step vote), and the run waits for the last save before it returns. A failed save removes its
`.partial` folder; a kill during a save leaves only a temporary file or `.partial` folder, removed at the next
start. A checkpoint that already has the name a save needs (damaged, unfinished, put there by hand) is set aside,
never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from encoder_train import checkpoint, distributed
from encoder_train.config import Config
from encoder_train.distributed import World
from encoder_train.errors import UserError
from encoder_train.state import TrainState, host_copy
from encoder_train.tracking import Tracker


def checkpoint_format(config: Config, world_size: int) -> str:
    """`single` or `sharded`: the config's choice; `auto` shards under FSDP2 with several processes."""
    chosen = config.checkpoint.format
    if chosen == "auto":
        return "sharded" if config.training.data_parallel == "fsdp" and world_size > 1 else "single"
    return chosen


def find_resume(config: Config, say=print, weights: bool = True,
                world: World | None = None) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to resume from, if any, refusing anything that would overwrite newer checkpoints. A sharded
    checkpoint comes without its tensors unless `weights` (the run loads its own shards into its model).

    Under torchrun rank 0 chooses (verifying every file, setting aside the damaged ones `latest` skips) and the
    other ranks read what it chose, so that all resume from the same checkpoint."""
    world = world or World()
    saved, chosen = None, (None, None)  # (path, error): what rank 0 tells the others
    if world.is_main:
        try:
            saved, path = _choose(config, say, weights)
            chosen = (str(path) if path else None, None)
        except UserError as e:
            chosen = (None, str(e))
    path, error = distributed.gather_objects(chosen, world)[0]
    if error is not None:
        raise UserError(error)
    if path is None or world.is_main:
        return saved, path and Path(path)
    return checkpoint.load(path, weights=weights, contents=False), Path(path)  # rank 0 hashed its files


def _choose(config: Config, say, weights: bool) -> tuple[dict[str, Any] | None, Path | None]:
    directory = Path(config.checkpoint.checkpoint_dir)
    existing = checkpoint.list_checkpoints(directory)
    wanted = config.checkpoint.load_checkpoint
    if wanted is None:
        if existing:
            unfinished = [p.name for _, p in existing if not checkpoint.is_complete(p)]
            raise UserError(
                f"checkpoint folder {directory} already holds checkpoints up to step {existing[-1][0]}"
                + (f" ({', '.join(unfinished)} without its {checkpoint.MARKER})" if unfinished else "")
                + "; resume them with --load_checkpoint latest, or pass an empty --checkpoint_dir."
            )
        return None, None
    if wanted == "latest":
        if not existing:
            say(f"no checkpoint in {directory} yet; starting a fresh run.")
            return None, None
        found = checkpoint.load_latest_good(directory, note=say, weights=weights, aside=True)
        if found is None:
            raise UserError(
                f"none of the {len(existing)} checkpoints in {directory} loads (each is set aside beside it); pass "
                "a good one with --load_checkpoint, or pass another --checkpoint_dir."
            )
        # Checkpoints newer than the good one were damaged and are set aside: the run writes good ones.
        return found
    path = Path(wanted)
    state = checkpoint.load(path, weights=weights)
    newer = [s for s, p in existing if s > state["step"] and p.resolve() != path.resolve()]
    if newer:
        raise UserError(
            f"checkpoint folder {directory} holds checkpoints newer than {path.name} (up to step {max(newer)}), "
            "which resuming would overwrite; resume with --load_checkpoint latest, or pass another --checkpoint_dir."
        )
    return state, path


def skip_unloadable(path: Path, error: UserError, world: World, say=print) -> None:
    """After the shards of `path` failed to load on some rank (every rank calls this): rank 0 sets it aside and says
    so, so that `find_resume` moves on to the previous checkpoint."""
    if world.is_main:
        say(checkpoint.skipped(path, error, aside=True))
    distributed.barrier(world)


class Saver:
    """Checkpoints of the run, written without stalling it (see the module): `state`'s snapshots, into the config's
    checkpoint folder, keeping the checkpoints of `kept_steps` (the ends of phases) through rotation."""

    def __init__(self, config: Config, world: World, state: TrainState, kept_steps: set[int], tracker: Tracker):
        self.config, self.world, self.state, self.kept_steps, self.tracker = config, world, state, kept_steps, tracker
        self.directory = Path(config.checkpoint.checkpoint_dir)
        self.format = checkpoint_format(config, world.world_size)
        self.last_path: Path | None = None
        self.failed = False  # set by the writer thread; the loop's per-step vote reads it
        self.saved_step: int | None = None if state.resumed_from is None else state.step
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group = None
        if self.format == "sharded" and world.distributed:
            import torch.distributed as dist

            # Its own gloo group: the background save's collectives must not interleave with training's.
            self._group = dist.new_group(backend="gloo")

    def save(self) -> None:
        self.wait()
        state = self.state
        step = state.step
        if self.world.is_main:
            self._clear_name(step)
        if self.format == "sharded":
            target, args = self._write_sharded, (*self._start_sharded(), host_copy(state.snapshot_rest()), step)
        else:
            target, args = self._write, (host_copy(state.snapshot()), step)
        self.saved_step = step
        if self.world.is_main or self.format == "sharded":  # every rank waits for its own shards
            self._writer = threading.Thread(target=target, args=args, name="checkpoint-writer")
            self._writer.start()

    def _clear_name(self, step: int) -> None:
        """Set aside a checkpoint that already has the name of `step`'s (it is not one this run wrote: `latest`
        would have resumed from it or set it aside), rather than replace it."""
        directory = self.directory
        for path in (checkpoint.checkpoint_path(directory, step), checkpoint.folder_path(directory, step)):
            if path.exists():
                aside = checkpoint.set_aside(path)
                self.tracker.write(f"step {step}: {path.name} was already there, not written by this run; set aside "
                                   f"as {aside.name}")

    def _start_sharded(self) -> tuple[Any, int]:
        """Copy this rank's shards to host memory and start writing them; returns the save's future and the
        checkpoint's size in bytes (for a full disk's message)."""
        import torch.distributed.checkpoint as dcp

        partial = checkpoint.partial_path(self.directory, self.state.step)
        shards = host_copy(self.state.shards())
        future = dcp.async_save(shards, checkpoint_id=str(partial), process_group=self._group,
                                no_dist=not self.world.distributed)
        return future, checkpoint.size_of(shards)

    def _write_sharded(self, future: Any, size: int, rest: dict[str, Any], step: int) -> None:
        directory, world = self.directory, self.world
        partial, final = checkpoint.partial_path(directory, step), checkpoint.folder_path(directory, step)
        try:
            try:
                future.result()  # on rank 0 this returns once every rank has written (DCP's metadata comes last)
                sums = self._gather_sums(partial)
            except checkpoint.DCP_ERRORS as e:  # every rank hears of any rank's failure: all are done writing
                if world.is_main:
                    shutil.rmtree(partial, ignore_errors=True)  # never a checkpoint: the rename had not happened
                error = checkpoint.write_error(e, final, size + checkpoint.size_of(rest))
                if not isinstance(error, UserError):  # DCP's CheckpointException would be a traceback
                    error = UserError(f"could not write checkpoint {final} ({checkpoint.dcp_reason(e)}); the previous "
                                      "checkpoints are kept.")
                raise error from None
            if world.is_main:
                path, aside = checkpoint.finish_sharded(partial, final, rest, sums)
                if aside is not None:
                    self.tracker.write(f"step {step}: {final.name} was already there, not written by this run; set "
                                       f"aside as {aside.name}")
                self._rotated(path, step)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            if world.is_main and partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
            self._error = e
            self.failed = True

    def _gather_sums(self, partial: Path) -> dict[str, str]:
        """Every rank hashes the files it wrote (in parallel, each its own); rank 0 gets them all. A rank that
        cannot read its files back fails the save on every rank."""
        world = self.world
        try:
            mine: dict[str, str] | str = {f.name: checkpoint.file_sha256(f)
                                          for f in checkpoint.shard_files(partial, world.rank)}
        except OSError as e:
            mine = f"rank {world.rank} could not read back {e.filename} ({e.strerror})"
        every = [mine]
        if self._group is not None:
            import torch.distributed as dist

            every = [None] * world.world_size
            dist.all_gather_object(every, mine, group=self._group)
        failed = [m for m in every if isinstance(m, str)]
        if failed:
            raise OSError(errno.EIO, "; ".join(failed))
        return {name: digest for m in every for name, digest in m.items()}

    def _write(self, snap: dict[str, Any], step: int) -> None:
        try:
            self._rotated(checkpoint.save(snap, self.directory, step), step)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e
            self.failed = True

    def _rotated(self, path: Path, step: int) -> None:
        deleted = checkpoint.rotate(self.directory, self.config.checkpoint.max_checkpoints, self.kept_steps)
        self.last_path = path
        self.tracker.write(f"step {step}: saved {path}" + (f", removed {len(deleted)} old" if deleted else ""))

    def wait(self) -> None:
        """Until the save in flight is on disk; its error, if it failed, is raised here."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def save_if_new(self) -> None:
        """Save unless the current step is saved already (or no step has finished), and wait for it."""
        if self.state.step > 0 and self.state.step != self.saved_step:
            self.save()
        self.wait()

    @contextlib.contextmanager
    def saved_on_failure(self, together: bool) -> Iterator[None]:
        """Run the block (a step's log and evaluation); if it fails, save the step that finished before it, then
        stop with the error. `together`: every rank runs the block at this step (the same condition on every rank),
        after which the ranks vote (one small all-reduce), so that all save and stop when any failed. Under
        torchrun a block that is not `together` (rank 0's logging alone) cannot save: the others are not there."""
        error: Exception | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any stop after a finished step saves that step first
            error = e
        world = self.world
        if world.distributed and not together:
            if error is not None:
                raise error
            return
        if not distributed.sum_ints([int(error is not None)], world)[0]:
            return
        try:
            self.save_if_new()
        except Exception as e:  # noqa: BLE001 - the failure that stopped the run is the news; kept() says the rest
            if error is None:
                raise
            self.tracker.write(f"step {self.state.step}: could not save it after the failure ({e})")
        if error is None or isinstance(error, UserError):
            reason = str(error) if error is not None else "another process's evaluation or logging failed"
            raise UserError(f"{reason.rstrip('.')} ({self.kept()}).") from None
        raise error

    def last_good(self) -> Path | None:
        return self.last_path or self.state.resumed_from

    def kept(self) -> str:
        where = self.last_good()
        return f"step {self.state.step} is saved in {where}" if where else "no step had finished"

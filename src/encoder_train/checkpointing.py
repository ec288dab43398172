"""The run's checkpoints as the loop sees them: which one to resume from, and a writer that saves without stalling
training, in either format (checkpoint.py has the files and folders themselves).

`single`: every rank takes a snapshot (a collective under FSDP, which gathers the whole state), copied to host
memory at once; rank 0 writes it as one file in a background thread. `sharded` (the default under FSDP2 with
several processes): every rank copies its own shards of the model and optimizer to host memory and hands them to
torch.distributed.checkpoint's asynchronous save, which writes them in the background over a process group of its
own (so that its collectives never interleave with training's); rank 0 then writes the rest of the state and the
marker, and renames the folder, once every rank has finished. Either way one save is in flight at most: a save
first waits for the previous one (and raises its error, a full disk say), its failure stops the run at the next
step (the loop's per-step vote), and the run waits for the last save before it returns. A kill during a save
leaves only a temporary file or `.partial` folder, removed at the next start.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoder_train import checkpoint
from encoder_train.config import Config
from encoder_train.errors import UserError
from encoder_train.state import host_copy
from encoder_train.tracking import Tracker

if TYPE_CHECKING:
    from encoder_train.train import Run


def checkpoint_format(config: Config, world_size: int) -> str:
    """`single` or `sharded`: the config's choice; `auto` shards under FSDP2 with several processes."""
    chosen = config.checkpoint.format
    if chosen == "auto":
        return "sharded" if config.training.data_parallel == "fsdp" and world_size > 1 else "single"
    return chosen


def find_resume(config: Config, say=print, weights: bool = True) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to resume from, if any, refusing anything that would overwrite newer checkpoints. A sharded
    checkpoint comes without its tensors unless `weights` (the run loads its own shards into its model)."""
    directory = Path(config.checkpoint.checkpoint_dir)
    existing = checkpoint.list_checkpoints(directory)
    wanted = config.checkpoint.load_checkpoint
    if wanted is None:
        if existing:
            raise UserError(
                f"checkpoint folder {directory} already holds checkpoints up to step {existing[-1][0]}; "
                "resume them with --load_checkpoint latest, or pass an empty --checkpoint_dir."
            )
        return None, None
    if wanted == "latest":
        if not existing:
            say(f"no checkpoint in {directory} yet; starting a fresh run.")
            return None, None
        found = checkpoint.load_latest_good(directory, note=say, weights=weights)
        if found is None:
            raise UserError(
                f"none of the {len(existing)} checkpoints in {directory} loads; pass a good one with "
                "--load_checkpoint, or pass another --checkpoint_dir."
            )
        # Checkpoints newer than the good one are damaged: the run will write good ones in their place.
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


class Saver:
    """Checkpoints of the run, written without stalling it (see the module)."""

    def __init__(self, run: Run, tracker: Tracker):
        self.run, self.tracker = run, tracker
        self.format = checkpoint_format(run.config, run.world.world_size)
        self.last_path: Path | None = None
        self.failed = False  # set by the writer thread; the loop's per-step vote reads it
        self.saved_step: int | None = None if run.state.resumed_from is None else run.state.step
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group = None
        if self.format == "sharded" and run.world.distributed:
            import torch.distributed as dist

            # Its own gloo group: the background save's collectives must not interleave with training's.
            self._group = dist.new_group(backend="gloo")

    def save(self) -> None:
        self.wait()
        state, run = self.run.state, self.run
        step = state.step
        if self.format == "sharded":
            target, args = self._write_sharded, (self._start_sharded(), host_copy(state.snapshot_rest()), step)
        else:
            target, args = self._write, (host_copy(state.snapshot()), step)
        self.saved_step = step
        if run.world.is_main or self.format == "sharded":  # every rank waits for its own shards
            self._writer = threading.Thread(target=target, args=args, name="checkpoint-writer")
            self._writer.start()

    def _start_sharded(self) -> Any:
        """Copy this rank's shards to host memory and start writing them; returns the save's future."""
        import torch.distributed.checkpoint as dcp

        partial = checkpoint.partial_path(self.run.checkpoint_dir, self.run.state.step)
        return dcp.async_save(host_copy(self.run.state.shards()), checkpoint_id=str(partial),
                              process_group=self._group, no_dist=not self.run.world.distributed)

    def _write_sharded(self, future: Any, rest: dict[str, Any], step: int) -> None:
        try:
            future.result()  # on rank 0 this returns once every rank has written (DCP's metadata comes last)
            if self.run.world.is_main:
                directory = self.run.checkpoint_dir
                path = checkpoint.finish_sharded(checkpoint.partial_path(directory, step),
                                                 checkpoint.folder_path(directory, step), rest)
                self._rotated(path, step)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e
            self.failed = True

    def _write(self, snap: dict[str, Any], step: int) -> None:
        try:
            self._rotated(checkpoint.save(snap, self.run.checkpoint_dir, step), step)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e
            self.failed = True

    def _rotated(self, path: Path, step: int) -> None:
        deleted = checkpoint.rotate(self.run.checkpoint_dir, self.run.config.checkpoint.max_checkpoints,
                                    self.run.plan.phase_ends())
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
        if self.run.state.step > 0 and self.run.state.step != self.saved_step:
            self.save()
        self.wait()

    def last_good(self) -> Path | None:
        return self.last_path or self.run.state.resumed_from

    def kept(self) -> str:
        where = self.last_good()
        return f"step {self.run.state.step} is saved in {where}" if where else "no step had finished"

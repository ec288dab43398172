"""`encoder-train eval --watch RUN_DIR`: evaluate a training run's checkpoints as they appear, and record the results
with the run at each checkpoint's step, without slowing the run beyond reading its checkpoints.

Which checkpoints: those the run keeps (the ends of its phases and its last one) and, with `--every N`, those of the
steps that are multiples of N. The newest checkpoint's plan (phases.Plan.progress) says where the phases end and
where the run ends; a checkpoint is taken only once its name exists (checkpoint.py: a file gets its name by the
rename that ends its write, a sharded folder only with its marker), oldest first. Each is one row, RUNNAME@STEP, of
the runner (runner.run_suite): the report in --output_dir grows as for `eval --model`.

Beside the run, never in its way: nothing here takes a lock the trainer waits on, and nothing of the run's is
written. A checkpoint to evaluate is first hard-linked into RUN_DIR/eval/reading/ (no copy: the same bytes), so
that the run's rotation may delete its name at any time; the links keep the bytes until the evaluation is done. One
that rotation deleted before the watcher got to it is skipped with a line. The process runs at the lowest CPU
priority (Linux's SCHED_IDLE, which only uses CPU time no other process wants; elsewhere nice 19), and with a
trainer on the same machine with half the CPU threads: on a machine or GPU of its own (a shared folder) it runs at
full speed.

Records, one writer per file:
  RUN_DIR/eval/records.jsonl          this process's: one line per (checkpoint, task), {"step", "task", "metrics",
                                      "model", "checkpoint"}, appended once the report holds the pair
  RUN_DIR/tensorboard/eval/           this process's event files: TensorBoard shows them as the run "eval" beside
                                      the training run, tags eval/TASK/METRIC at the checkpoint's step
  the run's W&B run                   the trainer forwards records.jsonl's lines at its log points (tracking.py);
                                      what comes after its last one, this process logs once the trainer has
                                      ended (RUN_DIR/eval/wandb.jsonl notes which)

Resume: a killed watcher started again skips what report.json holds (the runner) and what records.jsonl holds; the
event files are written again whole from records.jsonl at each start, so nothing is lost or doubled there.
Stop: when the checkpoint of the run's last step is evaluated and (for a run with W&B) its trainer has ended. A
trial run's training.stop_at is not the end: the watcher waits for the resume.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encoder_train import checkpoint
from encoder_train.errors import UserError, require
from encoder_train.evaluation.models import ModelRow, phase_ends
from encoder_train.evaluation.report import Report
from encoder_train.evaluation.runner import failures_sentence, run_suite
from encoder_train.evaluation.suite import PLAIN_NAME, Suite
from encoder_train.tracking import (
    WATCH_FOLDER,
    WATCH_RECORDS,
    WATCH_STEP,
    log_to_finished_run,
    read_forwarded,
    watch_metrics,
)

WANDB_SENT = "wandb.jsonl"  # RUN_DIR/eval/: the rows this process logged to the W&B run itself
READING = "reading"  # RUN_DIR/eval/reading/: hard links of the checkpoint being evaluated
LOCK = ".watch.lock"  # RUN_DIR/eval/.watch.lock: one watcher per run (records.jsonl has one writer)


@dataclass(frozen=True)
class RunView:
    """What the watcher needs of a run, from its newest checkpoint."""

    last_step: int  # where the run ends: its plan's steps (a resize of phases in tokens included)
    phase_ends: frozenset[int]
    checkpoint_every: int
    max_checkpoints: int
    tensorboard: bool
    wandb_project: str | None  # None: the run does not log to W&B
    wandb_run_id: str | None

    @classmethod
    def of(cls, meta: dict[str, Any]) -> RunView:
        config, plan = meta.get("config", {}), meta.get("plan") or {}
        phases = plan.get("phases") or []
        training = config.get("training", {})
        last = sum(int(p["length"]) for p in phases) if phases else int(training.get("max_steps", meta["step"]))
        wandb = config.get("wandb", {})
        return cls(last, frozenset(phase_ends(plan)), int(config.get("checkpoint", {}).get("checkpoint_every", 1)),
                   int(config.get("checkpoint", {}).get("max_checkpoints", 0)),
                   bool(config.get("tensorboard", {}).get("enabled")),
                   wandb.get("project") if wandb.get("enabled") else None, meta.get("wandb_run_id"))

    def wanted(self, step: int, every: int | None) -> bool:
        return step in self.phase_ends or step == self.last_step or bool(every and step % every == 0)


class Records:
    """RUN_DIR/eval/records.jsonl, which this process alone writes: one line per (checkpoint step, task)."""

    def __init__(self, path: Path):
        self.path = path
        data = path.read_bytes() if path.is_file() else b""
        if data and not data.endswith(b"\n"):  # a line cut short by a kill: the pair is written again
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
        self.lines: list[dict[str, Any]] = [json.loads(line) for line in data.splitlines()]
        self.keys = {(int(r["step"]), r["task"]) for r in self.lines}

    def has_all(self, step: int, tasks: list[str]) -> bool:
        return all((step, t) in self.keys for t in tasks)

    def add(self, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append the lines of `new` not here yet, in one write (a reader never sees a line without its end but the
        last); returns them."""
        new = [r for r in new if (int(r["step"]), r["task"]) not in self.keys]
        if not new:
            return []
        with self.path.open("ab") as f:
            f.write(b"".join(json.dumps(r).encode() + b"\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
        self.lines += new
        self.keys |= {(int(r["step"]), r["task"]) for r in new}
        return new


class EvalBoard:
    """The watcher's TensorBoard event files in RUN_DIR/tensorboard/eval. At each start they are written again whole
    from records.jsonl into a new file and the older files removed (they hold nothing else): a kill between a record
    and its event neither loses the point nor doubles it."""

    def __init__(self, folder: Path, records: list[dict[str, Any]]):
        require("tensorboard", "tensorboard", "writing the run's TensorBoard records (the run has tensorboard on)")
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        older = [p for p in folder.iterdir() if p.name.startswith("events.out.tfevents.")]
        self.writer = SummaryWriter(log_dir=str(folder))
        self.add(records)
        for p in older:
            p.unlink(missing_ok=True)

    def add(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            for tag, value in watch_metrics(r).items():
                self.writer.add_scalar(tag, value, int(r["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def watch(run_dir: Path, suite: Suite, output_dir: Path, every: int | None = None, poll_seconds: float = 30.0,
          name: str | None = None, device: torch.device | None = None,
          say: Callable[[str], None] | None = None) -> Report:
    """Evaluate RUN_DIR's kept checkpoints on `suite` as they appear until the run is done (see the module)."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    say = say or _say_now
    name = name or run_dir.resolve().name
    if not PLAIN_NAME.match(name):
        raise UserError(f"--watch {run_dir}: the run's name {name!r} is not a plain name; pass --name with letters, "
                        "digits, '.', '_' and '-' (it names the report's rows).")
    if every is not None and every <= 0:
        raise UserError(f"--every {every} must be a positive number of steps (e.g. the run's checkpoint_every).")
    if run_dir.exists() and not run_dir.is_dir() or checkpoint.FOLDER.match(run_dir.name):
        raise UserError(f"--watch {run_dir} is a checkpoint, not a run's checkpoint folder; pass the folder train "
                        "writes to (its --checkpoint_dir), or evaluate the checkpoint with --model.")
    waited = False
    while not run_dir.is_dir():  # started before the trainer made its folder: nothing is created in its place
        if not waited:
            say(f"waiting for {run_dir} to appear (the training run's --checkpoint_dir)")
            waited = True
        time.sleep(poll_seconds)
    folder = run_dir / WATCH_FOLDER
    try:
        (folder / READING).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--watch {run_dir}: cannot write {folder} ({e.strerror}); the watcher records its results "
                        "there, so it needs a run folder it can write to.") from None
    with WatchLock(folder / LOCK, run_dir):
        say(yield_cpu(run_dir))
        return Watcher(run_dir, suite, output_dir, every, poll_seconds, name, device, say).run()


@dataclass
class Watcher:
    run_dir: Path
    suite: Suite
    output_dir: Path
    every: int | None
    poll_seconds: float
    name: str
    device: torch.device | None
    say: Callable[[str], None]
    linking: bool = True  # False once the file system refused a hard link: checkpoints are read in place

    def run(self) -> Report:
        folder = self.run_dir / WATCH_FOLDER
        records = Records(folder / WATCH_RECORDS)
        records.add(self.from_report(records))  # pairs a killed watcher put in the report but not here
        tasks = [t.name for t in self.suite.tasks]
        board: EvalBoard | None = None
        view, peeked = None, None
        handled: set[int] = set()  # steps evaluated, failed or skipped in this session
        rows: list[ModelRow] = []
        waiting = started = False
        while True:
            found = [(s, p) for s, p in checkpoint.list_checkpoints(self.run_dir) if checkpoint.is_complete(p)]
            if found and found[-1][1] != peeked:  # read once per newest checkpoint
                peeked = found[-1][1]
                view = self.view(peeked) or view
            if view is None:
                if not waiting:
                    self.say(f"waiting for the first checkpoint in {self.run_dir}")
                    waiting = True
                time.sleep(self.poll_seconds)
                continue
            if not started:
                started = True
                if view.tensorboard:
                    board = EvalBoard(self.run_dir / "tensorboard" / WATCH_FOLDER, records.lines)
                if self.every and self.every % view.checkpoint_every:
                    self.say(f"note: --every {self.every} is not a multiple of the run's checkpoint_every "
                             f"({view.checkpoint_every}): only steps that are multiples of both are evaluated")
            newest, evaluated = found[-1][0], False
            for step in self.lost(view, found, newest, records, tasks, handled):
                handled.add(step)
                self.say(f"{self.name}@{step}: the checkpoint of step {step} was removed by the run's rotation "
                         f"(checkpoint.max_checkpoints {view.max_checkpoints}) before it could be read; skipped")
            for step, path in found:
                if step in handled or not view.wanted(step, self.every) or records.has_all(step, tasks):
                    continue
                handled.add(step)
                row, new = self.evaluate(step, path)
                rows += [row] if row else []
                new = records.add(new)
                if board is not None:
                    board.add(new)
                evaluated = True
            if newest >= view.last_step:
                break
            if not evaluated:  # else look again at once: more may have come while it evaluated
                time.sleep(self.poll_seconds)
        if board is not None:
            board.close()
        if view.wandb_project and view.wandb_run_id:
            self.send_late(view, records)
        report = Report.load(self.output_dir)
        failed = failures_sentence(report, rows, self.suite)
        if failed:
            raise UserError(failed)
        self.say(f"{self.name}: the run is done at step {view.last_step}; report: {self.output_dir / 'report.md'}")
        return report

    def view(self, path: Path) -> RunView | None:
        """The run as its newest checkpoint describes it; None when rotation removed that one meanwhile, or it does
        not load (said once: the trainer sets a damaged one aside when it resumes)."""
        try:
            if path.is_dir():
                meta = checkpoint.load(path, flag="--watch", weights=False, contents=False)
            else:  # the training state without its weights: mapped, not read
                meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return RunView.of(meta)
        except Exception as e:  # noqa: BLE001 - a file deleted or damaged under the unpickler fails anywhere in it
            if path.exists():
                self.say(f"note: {path.name} does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         "waiting for the next checkpoint")
            return None

    def evaluate(self, step: int, path: Path) -> tuple[ModelRow | None, list[dict[str, Any]]]:
        """One checkpoint on the suite (its links held while it is read); its results as records.jsonl lines."""
        name = f"{self.name}@{step}"
        target = self.run_dir / WATCH_FOLDER / READING / path.name
        _remove(target)  # a killed watcher's
        try:
            try:
                readable = (target if _link(path, target) else None) if self.linking else path
            except OSError as e:  # a file system without hard links: read in place (see the module)
                self.say(f"note: cannot hard-link {path.name} ({e.strerror}); reading checkpoints in place, where a "
                         "removal by rotation fails their tasks")
                self.linking, readable = False, path
            if readable is None:
                self.say(f"{name}: the checkpoint of step {step} was removed by the run's rotation before it could "
                         "be read; skipped")
                return None, []
            row = ModelRow(name, readable, step, "checkpoint", self.name)
            report = run_suite(self.suite, [row], self.output_dir, say=self.say, device=self.device)
        finally:
            _remove(target)
        report.data["models"][name]["path"] = str(path)  # the checkpoint's own name, not its links'
        report.write()
        return row, self.lines(report, name, step, path.name)

    def lines(self, report: Report, name: str, step: int, checkpoint_name: str) -> list[dict[str, Any]]:
        results = report.data["results"].get(name, {})
        return [{"step": step, "task": t.name, "metrics": results[t.name], "model": name,
                 "checkpoint": checkpoint_name} for t in self.suite.tasks if t.name in results]

    def from_report(self, records: Records) -> list[dict[str, Any]]:
        """The results of this run's checkpoints that the report holds and records.jsonl does not."""
        if not (self.output_dir / "report.json").is_file():
            return []
        report = Report.load(self.output_dir)
        new = []
        for name, info in report.data["models"].items():
            if info.get("group") != self.name or info.get("step") is None or name != f"{self.name}@{info['step']}":
                continue
            step = int(info["step"])
            new += [r for r in self.lines(report, name, step, Path(info["path"]).name)
                    if (step, r["task"]) not in records.keys]
        return new

    def lost(self, view: RunView, found: list[tuple[int, Path]], newest: int, records: Records, tasks: list[str],
             handled: set[int]) -> list[int]:
        """Steps of --every that the run saved, now older than its newest checkpoint and gone before they were
        evaluated (rotation; the ends of phases are never rotated)."""
        if not self.every:
            return []
        stride = math.lcm(self.every, view.checkpoint_every)
        present = {s for s, _ in found}
        return [s for s in range(stride, newest, stride)
                if s not in present and s not in handled and s not in view.phase_ends and not records.has_all(s, tasks)]

    def send_late(self, view: RunView, records: Records) -> None:
        """Once the trainer has ended: log to its W&B run the results it did not forward (it forwards one
        checkpoint's at each of its log points; the last checkpoint's come after its last)."""
        waiting = False
        while trainer_running(self.run_dir):
            if not waiting:
                self.say("waiting for the training process to end, to log the last results to its W&B run")
                waiting = True
            time.sleep(min(self.poll_seconds, 5.0))
        sent_path = self.run_dir / WATCH_FOLDER / WANDB_SENT
        sent, last = read_forwarded(self.run_dir / "metrics.jsonl")
        if sent_path.is_file():
            for line in sent_path.read_text().splitlines():
                if line.strip():
                    mine = json.loads(line)
                    sent |= {(int(mine[WATCH_STEP]), t) for t in mine["tasks"]}
                    last = max(last, int(mine["wandb_step"]))
        late: dict[int, dict[str, float]] = {}
        for r in records.lines:
            if (int(r["step"]), r["task"]) not in sent and (metrics := watch_metrics(r)):
                late.setdefault(int(r["step"]), {}).update(metrics)
        if not late:
            return
        # W&B's steps only grow: past the trainer's last, one per checkpoint (the charts' x axis is eval/step).
        rows = [(last + i, {WATCH_STEP: step, **late[step]}) for i, step in enumerate(sorted(late), start=1)]
        log_to_finished_run(view.wandb_project, view.wandb_run_id, self.run_dir, rows)
        with sent_path.open("a") as f:
            for wandb_step, row in rows:
                tasks = sorted({tag.split("/")[1] for tag in row if tag != WATCH_STEP})
                f.write(json.dumps({"wandb_step": wandb_step, WATCH_STEP: row[WATCH_STEP], "tasks": tasks}) + "\n")
        self.say(f"logged {len(rows)} checkpoint{'s' * (len(rows) != 1)}' results to W&B run {view.wandb_run_id} "
                 "after its training ended")


class WatchLock:
    """One watcher per run: an exclusive lock on RUN_DIR/eval/.watch.lock (released with the process, however it
    ends). The trainer never looks at it."""

    def __init__(self, path: Path, run_dir: Path):
        self.path, self.run_dir = path, run_dir
        self.fd: int | None = None

    def __enter__(self) -> WatchLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"--watch {self.run_dir}: another watcher ({holder}) is watching this run; stop it, or "
                            "let it finish (one watcher writes a run's records).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def trainer_running(run_dir: Path) -> bool:
    """Whether a training process holds the run folder's lock now (checkpoint.FolderLock), asked without taking it
    (F_GETLK): a trainer starting at that moment never finds it taken. Works across hosts on NFS as the lock does."""
    try:
        fd = os.open(run_dir / checkpoint.FolderLock.NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        # struct flock as Linux lays it out: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid (pid_t).
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0]
    finally:
        os.close(fd)
    return kind != fcntl.F_UNLCK


def yield_cpu(run_dir: Path) -> str:
    """Lower this process below any training: Linux's SCHED_IDLE for every thread (those started later inherit it),
    else nice 19; with a trainer on this machine (its lock file names this host, or none has started yet) and no
    OMP_NUM_THREADS, half the CPU threads. Returns the line that says so."""
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        priority = "the lowest CPU priority (SCHED_IDLE: only CPU time other processes leave idle)"
    except (AttributeError, OSError):
        os.nice(19)
        priority = "the lowest CPU priority (nice 19)"
    lock = run_dir / checkpoint.FolderLock.NAME
    try:
        here = json.loads(lock.read_text()).get("host") == socket.gethostname()
    except (OSError, ValueError, AttributeError):
        here = not lock.exists()
    if here and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        return f"watching {run_dir} at {priority}, beside its trainer: {torch.get_num_threads()} CPU thread(s)"
    return f"watching {run_dir} at {priority}, {torch.get_num_threads()} CPU thread(s)"


def _say_now(line: str) -> None:
    print(line, flush=True)  # a watcher's output often goes to a file: each line as it happens


def _link(path: Path, target: Path) -> bool:
    """Hard-link the checkpoint `path` (a file, or a sharded folder's files) as `target`; False when rotation removed
    it before or while the links were made."""
    try:
        if path.is_file():
            os.link(path, target)
            return True
        target.mkdir()
        for f in sorted(path.rglob("*")):
            if f.is_dir():
                (target / f.relative_to(path)).mkdir(exist_ok=True)
            else:
                os.link(f, target / f.relative_to(path))
    except FileNotFoundError:
        return False
    return path.exists()  # a folder's files are final once it has its name: linked whole unless it went meanwhile


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

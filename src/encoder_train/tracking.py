"""Where metrics go: progress on the terminal (a bar, or one plain line per log point when the output goes to
a file), and a set of sinks with one interface: `metrics.jsonl`, Weights & Biases and TensorBoard.

The loop hands the `Tracker` numbers that are already on the host, once per log point; each sink keeps
its own rhythm (W&B and TensorBoard every `log_freq` steps, the file at every log point). W&B and
TensorBoard are imported only when enabled, so a run without them never touches either. Adding a sink
(MLflow, say) is one class here with `log` and `close`, and one line in `Tracker.__init__`; a sink that continues
a run of its own on resume (as W&B does) keeps the run's id in `TrackerIds`, which every checkpoint saves: a field
and its key there, nothing elsewhere.

Downstream results of `encoder-train eval --watch` (evaluation/watch.py) reach the run's W&B run through the
trainer: the watcher appends them to RUN_DIR/eval/records.jsonl, a file it alone writes, and at each of its W&B log
points the trainer hands the oldest checkpoint's results not yet sent to its own run, in the row of that step, with
the checkpoint's step as `eval/step` (W&B's own step only grows: the eval/* charts use eval/step as their x axis).
Each row sent is also a line of metrics.jsonl, so that a resumed run sends none twice; what arrives after the run's
last log point the watcher sends itself, continuing the finished run (`log_to_finished_run`). One process writes
each file: the watcher's TensorBoard records are event files of its own, in RUN_DIR/tensorboard/eval.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from encoder_train.errors import UserError, require

Metrics = dict[str, float | int]

WATCH_FOLDER, WATCH_RECORDS = "eval", "records.jsonl"  # RUN_DIR/eval/records.jsonl: what `eval --watch` found
WATCH_STEP = "eval/step"  # the checkpoint's step, the x axis of the eval/TASK/METRIC charts in W&B


@dataclass(frozen=True)
class TrackerSettings:
    """What the Tracker records and where; pretraining builds it from its config, fine-tuning from its flags."""

    log_interval: int
    """Steps between progress lines and metrics.jsonl records."""
    progress: str = "auto"
    """"bar", "lines", or "auto": the bar on a terminal, lines when the output is a file."""
    wandb: bool = False
    wandb_project: str = "encoder-train"
    wandb_log_freq: int = 10
    tensorboard: bool = False
    tensorboard_log_freq: int = 10

    @classmethod
    def from_config(cls, config: Any) -> TrackerSettings:
        return cls(log_interval=config.training.log_interval, progress=config.training.progress,
                   wandb=config.wandb.enabled, wandb_project=config.wandb.project, wandb_log_freq=config.wandb.log_freq,
                   tensorboard=config.tensorboard.enabled, tensorboard_log_freq=config.tensorboard.log_freq)

    def lines(self) -> bool:
        """Plain lines rather than a bar: asked for, or `auto` with stderr not a terminal (a job's log file, where
        a bar's carriage-return redraws pile up as megabytes of one line)."""
        return self.progress == "lines" or (self.progress == "auto" and not sys.stderr.isatty())


def check_sink_folders(directory: Path, settings: TrackerSettings) -> None:
    """Refuse, before training starts, a sink's folder that is taken by a file or by a symbolic link to nothing (the
    sink would fail at start: it cannot create a folder where the link is)."""
    for enabled, name, flag in ((settings.tensorboard, "tensorboard", "--tensorboard"),
                                (settings.wandb and not os.environ.get("WANDB_DIR"), "wandb", "--wandb")):
        folder = directory / name
        if not enabled:
            continue
        if folder.is_symlink() and not folder.exists():
            raise UserError(f"{flag} writes into {folder}, a symbolic link to {os.readlink(folder)}, which does not "
                            "exist; create that folder, remove the link, or pass another --checkpoint_dir.")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{flag} writes into {folder}, which is a file; move that file away, or pass another "
                            "--checkpoint_dir.")


@dataclass
class TrackerIds:
    """The runs that trackers continue on resume, saved in every checkpoint (a part of state.TrainState): W&B's run
    id under `wandb_run_id`, the key checkpoints have always had. A tracker that resumes a run of its own keeps its
    id here: it reads it when it starts and sets it once its run has one (`Tracker.__init__`)."""

    wandb: str | None = None
    """--wandb_run_id, else the resumed checkpoint's, else the run W&B started."""

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.wandb}

    def load_state_dict(self, saved: dict[str, Any], path: Path | None = None) -> None:
        self.wandb = self.wandb or saved.get("wandb_run_id")  # a run id passed by flag wins over the checkpoint's


def watch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A records.jsonl line ({"step", "task", "metrics"}) as tags: eval/TASK/METRIC -> value, numbers only."""
    return {f"eval/{record['task']}/{name}": float(value) for name, value in record["metrics"].items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}


def forwarded_keys(record: dict[str, Any]) -> set[tuple[int, str]]:
    """The (checkpoint step, task) pairs a forwarded row (a metrics.jsonl line with eval/step) holds."""
    if WATCH_STEP not in record:
        return set()
    return {(int(record[WATCH_STEP]), tag.split("/")[1]) for tag in record
            if tag.startswith("eval/") and tag != WATCH_STEP}


def read_forwarded(metrics_path: Path) -> tuple[set[tuple[int, str]], int]:
    """What the trainer sent to W&B (from its metrics.jsonl, read only), and the last step it logged there."""
    sent: set[tuple[int, str]] = set()
    last = 0
    if metrics_path.is_file():
        for record in _records(metrics_path.read_bytes()):
            sent |= forwarded_keys(record)
            last = max(last, int(record.get("step", 0)))
    return sent, last


class WatchRecords:
    """RUN_DIR/eval/records.jsonl as `eval --watch` appends to it, read from where the last read stopped (a line
    not yet ended waits for the next read); each checkpoint's results become one row for the run's W&B run."""

    def __init__(self, path: Path, forwarded: set[tuple[int, str]]):
        self.path, self.seen = path, set(forwarded)  # (step, task) pairs already sent, by this run or before
        self.offset = 0
        self.pending: dict[int, dict[str, float]] = {}  # checkpoint step -> {eval/TASK/METRIC: value}

    def next_row(self) -> Metrics | None:
        """The oldest checkpoint's results not sent yet, as {eval/step, eval/TASK/METRIC...}, or None."""
        self._read()
        if not self.pending:
            return None
        step = min(self.pending)
        return {WATCH_STEP: step, **self.pending.pop(step)}

    def _read(self) -> None:
        try:
            size = self.path.stat().st_size  # a log point without a watcher costs this one stat
        except OSError:
            return
        if size <= self.offset:
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n") + 1
        self.offset += end
        for record in _records(data[:end]):
            try:
                key, metrics = (int(record["step"]), str(record["task"])), watch_metrics(record)
            except (KeyError, TypeError, ValueError, AttributeError):  # not a line the watcher wrote: never stop
                continue  # the run for it
            if key not in self.seen and metrics:
                self.seen.add(key)
                self.pending.setdefault(key[0], {}).update(metrics)


def log_to_finished_run(project: str, run_id: str, directory: Path, rows: list[tuple[int, Metrics]]) -> None:
    """Log `rows` ((W&B step, {eval/step, eval/...})) into the W&B run `run_id` once its trainer has finished: the
    run is continued (resume="allow"), so they join its history; steps must lie past the trainer's last."""
    wandb = require("wandb", "wandb", "logging to the training run's W&B run")
    kwargs: dict[str, Any] = {} if os.environ.get("WANDB_DIR") else {"dir": str(directory)}
    run = wandb.init(project=project, id=run_id, resume="allow", **kwargs)
    try:
        run.define_metric(WATCH_STEP)
        run.define_metric("eval/*", step_metric=WATCH_STEP)
        for step, row in rows:
            run.log(dict(row), step=step)
    finally:
        run.finish()


class Sink(Protocol):
    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        """Record `metrics` (with its "step"); kind: "train", "eval" or "watch" (a row of `eval --watch`'s results,
        forwarded to W&B); final: the run's last step."""

    def close(self) -> None: ...


class MetricsFile:
    """One JSON line per record, appended to `metrics.jsonl`; every log point is written once. A resumed run
    repeats the steps between its checkpoint and the crash; resume is exact, so those records are in the file
    already, with the same values, and are not written twice."""

    def __init__(self, path: Path, logged: dict[str, int]):
        self.path, self.logged = path, logged

    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        if kind != "watch" and metrics["step"] <= self.logged[kind]:  # a watch row comes once (WatchRecords)
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        pass


class WandbSink:
    """A W&B run that a resumed checkpoint continues (its id is stored in the checkpoint)."""

    def __init__(self, project: str, run_id: str | None, config: dict[str, Any], directory: Path, log_freq: int,
                 logged: dict[str, int]):
        wandb = require("wandb", "wandb", "--wandb")
        # Run files go next to the checkpoints unless the user chose a place with WANDB_DIR.
        kwargs: dict[str, Any] = {} if os.environ.get("WANDB_DIR") else {"dir": str(directory)}
        self.run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None, config=config,
                              **kwargs)
        self.run.define_metric(WATCH_STEP)  # eval --watch's results, charted against their checkpoint's step
        self.run.define_metric("eval/*", step_metric=WATCH_STEP)
        self.log_freq = log_freq
        # W&B's steps only grow: what the run logged before a crash stays, and a step below it would be dropped
        # with a warning. It logged what metrics.jsonl holds (both at the same log points).
        self.logged = logged

    def logs_at(self, step: int, final: bool) -> bool:
        """Whether a training record of `step` goes to the run (a step the run has not logged before)."""
        return step > self.logged["train"] and (final or step % self.log_freq == 0)

    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        step = int(metrics["step"])
        if kind == "watch":  # sent at a step logs_at allowed, into that step's row
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
            return
        if step <= self.logged[kind]:
            return
        if kind == "eval" or final or step % self.log_freq == 0:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """Event files under `directory`, one scalar per metric, tagged by its name (loss, lr, val_loss, ...)."""

    def __init__(self, directory: Path, log_freq: int, start_step: int):
        require("tensorboard", "tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: after a resume, TensorBoard drops what a killed run wrote past the checkpoint, so every
        # step after it is written again here (none is skipped, unlike metrics.jsonl and W&B, which keep theirs).
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=start_step + 1 if start_step else None)
        self.log_freq = log_freq

    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        step = int(metrics["step"])
        if kind == "watch":  # the watcher writes its own event files (RUN_DIR/tensorboard/eval)
            return
        if kind == "eval" or final or step % self.log_freq == 0:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, int | float):  # scalars only: a phase's name is text
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()  # at log points only: a crash loses nothing that metrics.jsonl kept

    def close(self) -> None:
        self.writer.close()


class Tracker:
    """Progress (a bar or plain lines) and the sinks; on every rank but 0 (enabled=False) it prints and writes
    nothing."""

    def __init__(self, *, directory: Path, total_steps: int, start_step: int, fresh: bool, settings: TrackerSettings,
                 run_config: dict[str, Any] | None = None, ids: TrackerIds | None = None, enabled: bool = True):
        """`ids`: the runs to continue (a resumed checkpoint's); the W&B run's id is set in it once it starts."""
        self.enabled, self.settings = enabled, settings
        self.ids = ids if ids is not None else TrackerIds()
        self.total, self.start_step, self.t0 = total_steps, start_step, time.perf_counter()
        self.lines = enabled and settings.lines()
        metrics_path = directory / "metrics.jsonl"
        logged = {"train": 0, "eval": 0}  # the last step of each kind of record already in metrics.jsonl
        forwarded: set[tuple[int, str]] = set()  # eval --watch results sent to W&B already
        if enabled and metrics_path.exists():
            if fresh:  # a new run: an old file belongs to a run that left no checkpoint
                aside = metrics_path.with_name(f"metrics.{int(metrics_path.stat().st_mtime)}.jsonl")
                metrics_path.rename(aside)
            else:
                logged, forwarded = _last_logged(metrics_path)
        self.sinks: list[Sink] = []
        self.wandb: WandbSink | None = None
        self.watch: WatchRecords | None = None
        # The sinks first: one that cannot start (W&B not installed) says so on a line of its own, not the bar's.
        if enabled:
            check_sink_folders(directory, settings)
            self.sinks.append(MetricsFile(metrics_path, logged))
            if settings.wandb:
                wandb = WandbSink(settings.wandb_project, self.ids.wandb, run_config or {}, directory,
                                  settings.wandb_log_freq, logged)
                self.ids.wandb = wandb.run.id
                self.sinks.append(wandb)
                self.wandb = wandb
                self.watch = WatchRecords(directory / WATCH_FOLDER / WATCH_RECORDS, forwarded)
            if settings.tensorboard:
                self.sinks.append(TensorBoardSink(directory / "tensorboard", settings.tensorboard_log_freq, start_step))
        self._log_points = [settings.log_interval, settings.wandb_log_freq if settings.wandb else 0,
                            settings.tensorboard_log_freq if settings.tensorboard else 0]
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=not enabled or self.lines)

    def due(self, step: int) -> bool:
        """Whether any sink records `step` (the loop then reads its numbers back from the device)."""
        return self.enabled and any(n and step % n == 0 for n in self._log_points)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, metrics: Metrics, final: bool = False) -> None:
        """A training record: the progress bar or line, then every sink."""
        step = int(metrics["step"])
        if self.lines and (final or step % self.settings.log_interval == 0):
            self.write(self.progress_line(metrics))
        else:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False,
                                 **({"phase": metrics["phase"]} if metrics.get("phase") else {}))
        self._dispatch("train", metrics, final)
        if self.watch is not None and self.wandb.logs_at(step, final):  # one checkpoint's results a log point
            row = self.watch.next_row()
            if row is not None:
                self._dispatch("watch", {"step": step, **row}, final)

    def progress_line(self, metrics: Metrics) -> str:
        """`step 120/300 (40%)  loss 5.1234  lr 1.20e-04  12,345 tok/s  elapsed 1m02s  eta 1m33s`: the ETA from
        this process's own pace (steps done since it started, over the time since)."""
        step, elapsed = int(metrics["step"]), time.perf_counter() - self.t0
        done = step - self.start_step
        eta = _duration((self.total - step) * elapsed / done) if done > 0 else "?"
        phase = f"  phase {metrics['phase']}" if metrics.get("phase") else ""
        return (f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)  loss {metrics['loss']:.4f}  "
                f"lr {metrics['lr']:.2e}  {metrics['tokens_per_second']:,.0f} tok/s  elapsed {_duration(elapsed)}  "
                f"eta {eta}{phase}")

    def log_eval(self, metrics: Metrics, line: str | None = None) -> None:
        """A held-out evaluation: a line above the bar (`line`, or the masked-LM scores), then every sink."""
        self.write(line or (
            f"step {metrics['step']}: val loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.4f}, "
            f"perplexity {metrics['val_perplexity']:.2f}"
        ))
        self._dispatch("eval", metrics, True)

    def _dispatch(self, kind: str, metrics: Metrics, final: bool) -> None:
        for sink in self.sinks:
            sink.log(kind, metrics, final)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.lines:
            print(message, file=sys.stderr, flush=True)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _duration(seconds: float) -> str:
    """`45s`, `3m07s`, `2h05m`."""
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _last_logged(path: Path) -> tuple[dict[str, int], set[tuple[int, str]]]:
    """The last step of each kind of record, and the watcher's (step, task) pairs forwarded; a last line cut short
    by a kill is removed."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    last, forwarded = {"train": 0, "eval": 0}, set()
    for record in _records(path.read_bytes()):
        if WATCH_STEP in record:
            forwarded |= forwarded_keys(record)
            continue
        kind = "eval" if "val_loss" in record else "train"
        last[kind] = max(last[kind], int(record.get("step", 0)))
    return last, forwarded


def _records(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file's bytes; a line cut short by a kill (or not JSON) is passed over."""
    found = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            found.append(record)
    return found

"""Where metrics go: a progress bar, and a set of sinks with one interface: `metrics.jsonl`, Weights &
Biases and TensorBoard.

The loop hands the `Tracker` numbers that are already on the host, once per log point; each sink keeps
its own rhythm (W&B and TensorBoard every `log_freq` steps, the file at every log point). W&B and
TensorBoard are imported only when enabled, so a run without them never touches either. Adding a sink
(MLflow, say) is one class here with `log` and `close`, and one line in `Tracker.__init__`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from encoder_train.errors import UserError

Metrics = dict[str, float | int]


class Sink(Protocol):
    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        """Record `metrics` (with its "step"); kind: "train" or "eval"; final: the run's last step."""

    def close(self) -> None: ...


class MetricsFile:
    """One JSON line per record, appended to `metrics.jsonl`; every log point is written."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        pass


class WandbSink:
    """A W&B run that a resumed checkpoint continues (its id is stored in the checkpoint)."""

    def __init__(self, project: str, run_id: str | None, config: dict[str, Any], directory: Path, log_freq: int):
        try:
            import wandb
        except ImportError:
            raise UserError(
                "--wandb needs the wandb package, which is not installed; pip install 'encoder-train[wandb]'."
            ) from None
        # Run files go next to the checkpoints unless the user chose a place with WANDB_DIR.
        kwargs: dict[str, Any] = {} if os.environ.get("WANDB_DIR") else {"dir": str(directory)}
        self.run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None, config=config,
                              **kwargs)
        self.log_freq = log_freq

    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        step = int(metrics["step"])
        if kind == "eval" or final or step % self.log_freq == 0:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """Event files under `directory`, one scalar per metric, tagged by its name (loss, lr, val_loss, ...)."""

    def __init__(self, directory: Path, log_freq: int, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--tensorboard needs the tensorboard package, which is not installed; "
                "pip install 'encoder-train[tensorboard]'."
            ) from None
        # purge_step: after a resume, TensorBoard hides what a killed run wrote past the checkpoint.
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=start_step + 1 if start_step else None)
        self.log_freq = log_freq

    def log(self, kind: str, metrics: Metrics, final: bool) -> None:
        step = int(metrics["step"])
        if kind == "eval" or final or step % self.log_freq == 0:
            for name, value in metrics.items():
                if name != "step":
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()  # at log points only: a crash loses nothing that metrics.jsonl kept

    def close(self) -> None:
        self.writer.close()


class Tracker:
    """The progress bar and the sinks; on every rank but 0 (enabled=False) it prints and writes nothing."""

    def __init__(self, *, directory: Path, total_steps: int, start_step: int, fresh: bool, config: dict[str, Any],
                 wandb_run_id: str | None, enabled: bool = True):
        self.enabled = enabled
        metrics_path = directory / "metrics.jsonl"
        # Steps already recorded, per kind of record. A resumed run repeats the steps between its checkpoint
        # and the crash; resume is exact, so those records exist already, with the same values.
        self.logged = {"train": 0, "eval": 0}
        if enabled and metrics_path.exists():
            if fresh:  # a new run: an old file belongs to a run that left no checkpoint
                aside = metrics_path.with_name(f"metrics.{int(metrics_path.stat().st_mtime)}.jsonl")
                metrics_path.rename(aside)
            else:
                self.logged = _last_logged(metrics_path)
        self.sinks: list[Sink] = []
        self._wandb: WandbSink | None = None
        self._log_points: list[int] = []
        # The sinks first: one that cannot start (W&B not installed) says so on a line of its own, not the bar's.
        if enabled:
            self._start_sinks(directory, metrics_path, config, wandb_run_id, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=not enabled)

    def _start_sinks(self, directory: Path, metrics_path: Path, config: dict[str, Any], wandb_run_id: str | None,
                     start_step: int) -> None:
        self.sinks.append(MetricsFile(metrics_path))
        if config["wandb"]["enabled"]:
            w = config["wandb"]
            self._wandb = WandbSink(w["project"], wandb_run_id, config, directory, w["log_freq"])
            self.sinks.append(self._wandb)
        if config["tensorboard"]["enabled"]:
            self.sinks.append(TensorBoardSink(directory / "tensorboard", config["tensorboard"]["log_freq"],
                                              start_step))
        self._log_points = [config["training"]["log_interval"], config["wandb"]["log_freq"] if self._wandb else 0,
                            config["tensorboard"]["log_freq"] if config["tensorboard"]["enabled"] else 0]

    @property
    def wandb_run_id(self) -> str | None:
        return None if self._wandb is None else self._wandb.run.id

    def due(self, step: int) -> bool:
        """Whether any sink records `step` (the loop then reads its numbers back from the device)."""
        return self.enabled and any(n and step % n == 0 for n in self._log_points)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, metrics: Metrics, final: bool = False) -> None:
        """A training record: the progress bar, then every sink."""
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_second']:.0f}",
            refresh=False,
        )
        self._dispatch("train", metrics, final)

    def log_eval(self, metrics: Metrics, line: str | None = None) -> None:
        """A held-out evaluation: a line above the bar (`line`, or the masked-LM scores), then every sink."""
        self.write(line or (
            f"step {metrics['step']}: val loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.4f}, "
            f"perplexity {metrics['val_perplexity']:.2f}"
        ))
        self._dispatch("eval", metrics, True)

    def _dispatch(self, kind: str, metrics: Metrics, final: bool) -> None:
        if metrics["step"] <= self.logged[kind]:  # recorded before the resume already
            return
        for sink in self.sinks:
            sink.log(kind, metrics, final)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _last_logged(path: Path) -> dict[str, int]:
    """The last step of each kind of record; a last line cut short by a kill is removed."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    last = {"train": 0, "eval": 0}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        kind = "eval" if "val_loss" in record else "train"
        last[kind] = max(last[kind], int(record.get("step", 0)))
    return last

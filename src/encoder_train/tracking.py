"""Where metrics go: a tqdm progress bar, `metrics.jsonl`, and (with --wandb) Weights & Biases.

One small object; the loop hands it numbers that are already on the host. W&B is imported only when
enabled, so a run without --wandb never touches it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from encoder_train.errors import UserError


class Tracker:
    def __init__(
        self,
        *,
        metrics_path: Path,
        total_steps: int,
        start_step: int,
        fresh: bool,
        wandb_enabled: bool,
        wandb_project: str,
        wandb_run_id: str | None,
        config: dict[str, Any],
        wandb_dir: Path,
        enabled: bool = True,
    ):
        self.enabled = enabled  # False on every rank but 0: nothing is printed, written or sent
        self.metrics_path = metrics_path
        # Steps already recorded, per kind of record. A resumed run repeats the steps between its
        # checkpoint and the crash; resume is exact, so those records exist already, with the same values.
        self.logged = {"train": 0, "eval": 0}
        if enabled and metrics_path.exists():
            if fresh:  # a new run: an old file belongs to a run that left no checkpoint
                aside = metrics_path.with_name(f"metrics.{int(metrics_path.stat().st_mtime)}.jsonl")
                metrics_path.rename(aside)
            else:
                self.logged = _last_logged(metrics_path)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=not enabled)
        self.run = None
        if wandb_enabled and enabled:
            self.run = _start_wandb(wandb_project, wandb_run_id, config, wandb_dir)

    @property
    def wandb_run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, metrics: dict[str, float | int]) -> None:
        """A log-interval record: progress bar, and one JSON line appended to metrics.jsonl."""
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_second']:.0f}",
            refresh=False,
        )
        self._append("train", metrics)

    def _append(self, kind: str, metrics: dict[str, float | int]) -> None:
        if not self.enabled or metrics["step"] <= self.logged[kind]:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def log_eval(self, metrics: dict[str, float | int]) -> None:
        """A held-out evaluation: a line above the bar, metrics.jsonl and W&B."""
        self.write(
            f"step {metrics['step']}: val loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.4f}, "
            f"perplexity {metrics['val_perplexity']:.2f}"
        )
        self._append("eval", metrics)
        self.log_wandb(metrics, kind="eval")

    def log_wandb(self, metrics: dict[str, float | int], kind: str = "train") -> None:
        step = int(metrics["step"])
        if self.run is not None and step > self.logged[kind]:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


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


def _start_wandb(project: str, run_id: str | None, config: dict[str, Any], directory: Path) -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError(
            "--wandb needs the wandb package, which is not installed; pip install 'encoder-train[wandb]'."
        ) from None
    # Run files go next to the checkpoints unless the user chose a place with WANDB_DIR.
    kwargs: dict[str, Any] = {} if os.environ.get("WANDB_DIR") else {"dir": str(directory)}
    return wandb.init(project=project, id=run_id, resume="allow" if run_id else None, config=config, **kwargs)

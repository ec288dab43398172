"""`classification`: fine-tune on a GLUE-layout task (or train/dev files) over a learning-rate grid and several
seeds, and report as the papers do.

The protocol (RoBERTa, ModernBERT, Ettin): every learning rate of `learning_rates` is fine-tuned with every seed of
`seeds` (finetune.loop.finetune: the best epoch on the first validation file is each run's result). The rate whose
MEDIAN task score over the seeds is highest is chosen (a tie: the lower rate), and each metric is reported as the
median over the seeds at that rate; its spread over those seeds (min, max, sample std) is in report.json's details,
with every grid point's medians and per-seed numbers. The task score is GLUE's: the mean of the task's metrics.

Layouts: `data_dir` with `task` naming a GLUE task (its folder as GLUE's download has it: train.tsv, dev.tsv or
MNLI's dev_matched.tsv and dev_mismatched.tsv; the task's columns, labels, metrics and hyper-parameters from
finetune/glue.py); `data_dir` alone (train.tsv and dev.tsv, the columns found as `encoder-train finetune` finds
them); or `train_file` and `validation_files`. Fine-tuning writes under the pair's work folder; its checkpoints are
removed once each run is scored (the report keeps the numbers).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder_train.errors import UserError
from encoder_train.evaluation.spec import EvalModel, Metrics, TaskConfig
from encoder_train.finetune.glue import glue_task, resolve_task, task_files
from encoder_train.finetune.loop import FinetuneSettings, check_metrics, finetune
from encoder_train.finetune.tasks import Task

# ModernBERT's GLUE sweep (its paper, appendix): the grid when the suite names none.
LEARNING_RATES = (1e-5, 3e-5, 5e-5, 8e-5)


@dataclass(frozen=True)
class Settings:
    data_dir: Path | None = None
    """A task folder: train.tsv and dev.tsv (a GLUE task's own validation files when `task` names one)."""
    task: str | None = None
    """A GLUE task's name (RTE, MRPC, STS-B, ...): its columns, labels, metrics and hyper-parameters."""
    train_file: Path | None = None
    """Instead of data_dir: the training file (.tsv, .csv or .jsonl)."""
    validation_files: list[Path] | None = None
    """With train_file: the files scored (the first chooses each run's best epoch)."""
    text_fields: list[str] | None = None
    """One column, or two for a pair; None: as `encoder-train finetune` finds them."""
    label_field: str | None = None
    """The label column; None: `label`."""
    regression: bool = False
    """Labels are numbers (scored by pearson and spearman)."""
    metrics: list[str] | None = None
    """The metrics reported (finetune/metrics.py); None: the GLUE task's, else accuracy (pearson, spearman)."""
    learning_rates: tuple[float, ...] = LEARNING_RATES
    """The grid of peak learning rates."""
    seeds: int | list[int] = 5
    """N (seeds 0 .. N-1) or the seeds themselves."""
    epochs: int | None = None
    """None: the GLUE task's (finetune/glue.py), else 3."""
    batch_size: int | None = None
    """None: the GLUE task's, else 32."""
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    dropout: float | None = None
    pooling: str | None = None
    """ModernBERT's head: cls or mean; None: cls."""
    precision: str | None = None
    """bf16 or fp32; None: bf16 where the device computes it natively, else fp32."""
    max_length: int = 512
    """Tokens per example with the special tokens; at most the model's positions."""

    def __post_init__(self) -> None:
        if (self.data_dir is None) == (self.train_file is None):
            raise UserError("give either data_dir (a task folder) or train_file with validation_files")
        if self.train_file is not None and not self.validation_files:
            raise UserError("train_file needs validation_files (the files scored)")
        if not self.learning_rates or not all(math.isfinite(r) and r > 0 for r in self.learning_rates):
            raise UserError(f"learning_rates {list(self.learning_rates)} must be a list of positive numbers")
        seeds = self.seed_list()
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"seeds {self.seeds} must be a positive count or a list of distinct seeds")

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def overrides(self) -> dict[str, Any]:
        """The FinetuneSettings fields the suite sets."""
        names = ("epochs", "batch_size", "warmup_ratio", "weight_decay", "dropout", "pooling", "precision")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None} | {"max_length": self.max_length}


def load(task: TaskConfig) -> tuple[Task, tuple[str, ...], dict[str, Any]]:
    """The task's examples, its metrics and the hyper-parameters its GLUE task brings."""
    s: Settings = task.settings
    if s.data_dir is not None:
        if not s.data_dir.is_dir():
            raise UserError(f"data_dir {s.data_dir} of task {task.name} ({task.suite_file}) is not a folder; pass "
                            "a folder with train.tsv and dev.tsv.")
        if s.task is not None:
            train, validation = task_files(glue_task(s.task), s.data_dir)
        else:
            train, validation = s.data_dir / "train.tsv", sorted(s.data_dir.glob("dev*.tsv"))
            if not train.is_file() or not validation:
                raise UserError(f"data_dir {s.data_dir} of task {task.name} ({task.suite_file}) lacks train.tsv or "
                                "dev.tsv; pass a folder laid out as GLUE's, or train_file and validation_files.")
    else:
        train, validation = s.train_file, list(s.validation_files or [])
    return resolve_task(train, [str(v) for v in validation], None, s.task, s.text_fields, s.label_field,
                        s.regression, s.metrics)


def check(task: TaskConfig) -> None:
    loaded, metrics, glue_settings = load(task)
    settings(task, glue_settings, task.settings.learning_rates[0], 0)  # its own checks, before any model loads
    check_metrics(metrics, loaded)


def settings(task: TaskConfig, glue_settings: dict[str, Any], learning_rate: float, seed: int,
             precision: str = "fp32") -> FinetuneSettings:
    s: Settings = task.settings
    return FinetuneSettings(**{"precision": precision, **glue_settings, **s.overrides(),
                               "learning_rate": learning_rate, "seed": seed, "num_seeds": 1, "progress": "lines",
                               "log_interval": 1 << 30})


def run(task: TaskConfig, model: EvalModel, work_dir: Path) -> Metrics:
    from encoder_train import devices

    s: Settings = task.settings
    loaded, metrics, glue_settings = load(task)
    source = model.finetune_source()
    native = "bf16" if devices.native_bf16(devices.pick_device()) else "fp32"  # finetune's own device
    seeds = s.seed_list()
    runs: dict[float, list[dict[str, float]]] = {}
    for rate in s.learning_rates:
        runs[rate] = []
        for seed in seeds:
            result = finetune(source, loaded, metrics, settings(task, glue_settings, rate, seed, native),
                              work_dir / f"lr_{rate:g}", overwrite=True, say=lambda _: None, task_name=task.name)
            (only,) = result.seeds
            only.checkpoint.unlink(missing_ok=True)  # scratch: the numbers are what the report keeps
            runs[rate].append({"seed": seed, "epoch": only.epoch, "score": only.score, **only.metrics})
    best, grid, found, spread = summarise(runs)
    used = dataclasses.asdict(settings(task, glue_settings, best, seeds[0], native))
    hyper = {k: used[k] for k in ("batch_size", "epochs", "warmup_ratio", "weight_decay", "dropout", "pooling",
                                  "precision", "max_length", "gradient_clip")}
    return {**found, "details": {"learning_rate": best, "seeds": seeds, "spread": spread, "grid": grid,
                                 "hyperparameters": hyper}}


def summarise(runs: dict[float, list[dict[str, float]]]) -> tuple[float, dict[str, Any], dict[str, float],
                                                                   dict[str, dict[str, float]]]:
    """{rate: every seed's {seed, epoch, score, metric: value}} -> (the chosen rate, the grid of medians with the
    runs, each metric's median at that rate, its spread there: min, max, sample std)."""
    grid = {}
    for rate, seeds in runs.items():
        names = [k for k in seeds[0] if k not in ("seed", "epoch")]
        grid[f"{rate:g}"] = {**{k: statistics.median(r[k] for r in seeds) for k in names}, "per_seed": seeds}
    best = max(runs, key=lambda rate: (grid[f"{rate:g}"]["score"], -rate))  # a tie: the lower rate
    chosen = runs[best]
    names = [k for k in chosen[0] if k not in ("seed", "epoch", "score")]
    found = {k: grid[f"{best:g}"][k] for k in names}
    spread = {k: {"min": min(r[k] for r in chosen), "max": max(r[k] for r in chosen),
                  "std": statistics.stdev([r[k] for r in chosen]) if len(chosen) > 1 else 0.0} for k in names}
    return best, grid, found, spread

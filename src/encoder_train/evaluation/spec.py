"""The contracts of the evaluation harness: a task as the suite gives it, a task kind, a model under evaluation.

A kind is a module in kinds/ with a settings dataclass (its YAML keys, each field a key with a docstring-like
comment; unknown keys are refused by name) and two functions: `check` reads the task's files before any model is
loaded (so a malformed corpus line is one sentence before minutes of embedding), and `run` scores one model.

A settings field's type is what the suite must give (suite.py checks it and names the key): int, float, str, bool,
Path, `Literal[...]`, `X | None`, `list[X]` (or `tuple[X, ...]`), `dict[str, X]` and unions of those. A `Path`
field is a local path; a `str` field with `metadata=LOCATION` is a path or a URL (a data folder in a bucket).
Either, when relative, is resolved against the suite file's folder. Every kind's settings have `max_length`: the
tokens per text (or row) the task reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from encoder_train.finetune.loop import Source
    from encoder_train.state import Trained

LOCATION = {"location": True}  # a str field's metadata: a local path or a URL, resolved against the suite's folder
Metrics = dict[str, Any]  # metric name -> number, plus optional "details" (seeds, spread, settings) for report.json


@dataclass(frozen=True)
class TaskConfig:
    """One task of a suite: its name (a row of the report), kind, and the kind's settings object."""

    name: str
    kind: str
    settings: Any  # the kind's settings dataclass, relative paths already resolved against the suite's folder
    suite_file: Path
    reference: dict[str, float] = field(default_factory=dict)  # published values: a reference column in report.md
    reference_source: str | None = None  # where the reference values come from (paper, table)


class EvalModel(Protocol):
    """A model under evaluation, loaded lazily: a kind asks for the form it needs."""

    name: str  # the report's row: NAME, or NAME@STEP for a run folder's checkpoints
    step: int | None  # the training step of a checkpoint; None for a Hugging Face folder
    device: torch.device  # where the kinds compute (--device, else a GPU when there is one)

    def files_fingerprint(self) -> str:
        """What tells this model's files from changed ones (sizes and modification times): a cached fine-tune's key."""

    def finetuned_dir(self) -> Path:
        """Where this model's fine-tunes are kept, one folder per key: OUTPUT_DIR/finetuned/<row name>/."""

    def hf_folder(self) -> Path:
        """A local Hugging Face folder of this model (an export of our checkpoint, cached under the output dir)."""

    def sentence_transformer(self, max_length: int) -> Any:
        """A sentence_transformers.SentenceTransformer over hf_folder() with mean pooling, truncating at
        min(max_length, the model's window)."""

    def masked_lm(self) -> Trained:
        """Our MaskedLM with its tokenizer and mask spec, on the evaluation's device, in eval mode: a checkpoint's
        own, or a Hugging Face folder of a family we import (hf.import_hf refuses others in one sentence)."""

    def finetune_source(self) -> Source:
        """The pretrained weights a fine-tuning starts from (finetune.loop.Source), on the CPU."""


class Kind(Protocol):
    """A task kind: kinds/<name>.py exposes these three names."""

    Settings: type  # dataclass of the task's YAML keys

    def check(self, task: TaskConfig) -> None:
        """Read and validate the task's files; raise UserError naming the file and the fix."""

    def run(self, task: TaskConfig, model: EvalModel, work_dir: Path) -> Metrics:
        """Score `model` on the task; `work_dir` is this (model, task)'s own scratch folder under the output."""

"""`mlm`: held-out masked-LM loss and accuracy at a fixed mask rate, on a folder of .pt shards.

The rows are read in order and each is masked by a generator seeded from (`seed`, the row's index), as
`encoder-train evaluate` does (evaluate.eval_batches): every model and checkpoint sees the same masks, whatever the
batch size, so their numbers compare. With the defaults (rate 0.15, evaluate's seed) the numbers are those of
`encoder-train evaluate` on a checkpoint trained at a 15% rate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from encoder_train.data.shards import scan_shards
from encoder_train.errors import UserError
from encoder_train.evaluate import EVAL_SEED, check_same_vocabulary, evaluate
from encoder_train.evaluation.spec import LOCATION, EvalModel, Metrics, TaskConfig
from encoder_train.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Settings:
    data_dir: str = field(metadata=LOCATION)
    """Folder (or s3://, gs://, hf:// URL) of held-out .pt shards, searched recursively."""
    mask_rate: float = 0.15
    """Share of the maskable tokens masked (80% <mask>, 10% random, 10% kept, as in training)."""
    batch_size: int = 32
    """Rows per batch (the masks do not depend on it)."""
    max_batches: int | None = None
    """Stop after this many batches; None: every row."""
    max_length: int = 512
    """The widest row the task accepts; at most the model's positions (a wider shard is refused)."""
    seed: int = EVAL_SEED
    """Seeds the masks; the default is `encoder-train evaluate`'s."""
    tokenizer: Path | None = None
    """The tokenizer.json the shards were made with: a model whose vocabulary differs is refused (without it,
    only ids outside the model's vocabulary are)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mask_rate) and 0 < self.mask_rate < 1):
            raise UserError(f"mask_rate {self.mask_rate} must lie between 0 and 1 (e.g. 0.15)")
        for key in ("batch_size", "max_length") + (("max_batches",) if self.max_batches is not None else ()):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} {getattr(self, key)} must be a positive integer")


def check(task: TaskConfig) -> None:
    s: Settings = task.settings
    scan_shards(s.data_dir, s.max_length, flag=_flag(task))
    if s.tokenizer is not None:
        load_tokenizer(s.tokenizer)


def run(task: TaskConfig, model: EvalModel, work_dir: Path) -> Metrics:
    s: Settings = task.settings
    trained = model.masked_lm()
    if s.tokenizer is not None:
        check_same_vocabulary(trained, load_tokenizer(s.tokenizer), s.tokenizer, model.name,
                              fix=f"evaluate model {model.name} on shards made with its own tokenizer, or leave it out "
                                  f"of task {task.name}")
    shards = scan_shards(s.data_dir, min(s.max_length, trained.model.dims.max_tokens), flag=_flag(task))
    spec = dataclasses.replace(trained.spec, probability=s.mask_rate)
    result = evaluate(trained.model, shards, spec, batch_size=s.batch_size, device=model.device,
                      max_batches=s.max_batches, seed=s.seed)
    return {"loss": result["loss"], "accuracy": result["accuracy"], "perplexity": result["perplexity"],
            "details": {"tokens": result["tokens"], "rows": result["rows"]}}


def _flag(task: TaskConfig) -> str:
    return f"data_dir of task {task.name} ({task.suite_file})"

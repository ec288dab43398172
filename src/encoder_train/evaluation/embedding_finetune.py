"""The short fine-tune before scoring embeddings: sentence-transformers' trainer and one of its losses, on a copy.

The retrieval kind trains with in-batch negatives (MultipleNegativesRankingLoss, or its gradient-cache variant for
batches larger than memory holds); the STS kind with CoSENT on scored pairs. Both go through `fine_tune`, which
copies the model (the EvalModel's own stays as loaded, for the zero-shot numbers and for other tasks), trains the
copy with AdamW and a linear warmup then decay, and keeps each step's loss.

`cached_fine_tune` keeps the trained copy: tasks that fine-tune the same model on the same file with the same
settings (the papers' BEIR and MLDR tasks, on the MS MARCO triplets) train once. The copy is saved under
OUTPUT_DIR/finetuned/<row name>/<key>/, the key a hash of what the training read: the model's files (sizes and
modification times), the train file's path, size and modification time, the settings, the loss and the tokens per
text it trained at. It is written into a temporary folder and renamed, so a folder of that name is complete (a
killed run leaves only a `.KEY.*.tmp`, removed by the next); every later task and rerun with that key loads it.

Deterministic under `seed`: the trainer seeds torch's generators (dropout) before the first step and its sampler
draws the batches from a generator seeded with it too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from encoder_train.errors import UserError, require
from encoder_train.evaluation.quiet import transformers_quietly
from encoder_train.evaluation.spec import EvalModel, TaskConfig

SUMMARY = "fine_tune.json"  # in a cached fine-tune's folder: what trained it (the key's inputs) and its summary


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    learning_rate: float
    batch_size: int  # rows (pairs) per optimizer step (the in-batch negatives of each query: batch_size - 1)
    warmup_ratio: float  # the share of the steps over which the rate rises linearly from 0
    seed: int
    no_duplicates: bool  # in-batch negatives: a batch never holds one text twice (it would be its own negative)


@dataclass(frozen=True)
class TrainResult:
    model: Any  # the trained copy, a SentenceTransformer
    losses: list[float]  # the training loss of each optimizer step, in order
    seconds: float

    def summary(self) -> dict[str, Any]:
        """What report.json's details keep of the fine-tune (the trajectory's ends, not every step)."""
        return {"steps": len(self.losses), "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "seconds": round(self.seconds, 3)}


def check_settings(task: TaskConfig, positive: tuple[str, ...], fractions: tuple[str, ...] = ()) -> None:
    """Refuse a task's numbers that cannot run: `positive` keys must be above 0, `fractions` in [0, 1)."""
    for key in positive:
        value = getattr(task.settings, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise UserError(f"{task.suite_file}: task {task.name!r}: {key} is {value!r}; give a number above 0.")
    for key in fractions:
        value = getattr(task.settings, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise UserError(f"{task.suite_file}: task {task.name!r}: {key} is {value!r}; give a number from 0 up to "
                            "(not including) 1.")


def _trainer_class() -> type:
    from sentence_transformers import SentenceTransformerTrainer

    class Trainer(SentenceTransformerTrainer):
        def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
            """No model card is written: its callback (which draws widget examples from the rows, with a progress
            bar of its own) is left out."""

    return Trainer


def fine_tune(model: Any, columns: dict[str, list], make_loss: Any, settings: TrainSettings,
              work_dir: Path) -> TrainResult:
    """Train a copy of `model` (a SentenceTransformer) on `columns` (dataset column -> values, in the order the loss
    reads them) with the loss `make_loss(copy)` builds."""
    datasets = require("datasets", "eval", "a fine-tune before scoring embeddings")
    require("sentence_transformers", "eval", "a fine-tune before scoring embeddings")
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from transformers import PrinterCallback

    trained = copy.deepcopy(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(work_dir) / "finetune"),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_ratio,  # a float below 1: the share of all steps
        lr_scheduler_type="linear",
        seed=settings.seed,
        data_seed=settings.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES if settings.no_duplicates else BatchSamplers.BATCH_SAMPLER,
        logging_strategy="steps",
        logging_steps=1,  # every step's loss: the trajectory the tests compare, and the details' first and last
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only warns
    )
    dataset = datasets.Dataset.from_dict(columns)
    trainer = _trainer_class()(model=trained, args=args, train_dataset=dataset, loss=make_loss(trained))
    trainer.remove_callback(PrinterCallback)  # it prints every step's log line; the losses are kept below instead
    t0 = time.perf_counter()
    with transformers_quietly():
        trainer.train()
    seconds = time.perf_counter() - t0
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    trained.eval()
    return TrainResult(trained, losses, seconds)


@dataclass(frozen=True)
class CachedFineTune:
    model: Any  # the trained copy loaded from its folder, a SentenceTransformer truncating as the task scores
    folder: Path  # OUTPUT_DIR/finetuned/<row name>/<key>/
    summary: dict[str, Any]  # what trained it and TrainResult.summary() of the run that did, as fine_tune.json holds
    reused: bool  # True: an earlier task (or run) trained it


def cached_fine_tune(model: EvalModel, trainee: Any, train_file: Path, load_columns: Callable[[], dict[str, list]],
                     make_loss: Any, settings: TrainSettings, loss: dict[str, Any], scoring_length: int,
                     work_dir: Path) -> CachedFineTune:
    """`fine_tune(trainee, load_columns(), ...)` once per key (see the module), then the trained copy from its folder
    truncating at `scoring_length` tokens. `loss` names the loss and its settings (part of the key); `trainee` is
    `model`'s SentenceTransformer at the tokens per text the fine-tune reads."""
    stat = Path(train_file).stat()
    identity = {"model": model.files_fingerprint(),
                "train_file": {"path": str(Path(train_file).resolve()), "size": stat.st_size,
                               "mtime_ns": stat.st_mtime_ns},
                "settings": asdict(settings), "loss": loss, "max_seq_length": trainee.max_seq_length}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = model.finetuned_dir() / key
    reused = (folder / SUMMARY).is_file()
    if not reused:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{key}.*.tmp"):  # a fine-tune killed while saving (the folder is locked)
            shutil.rmtree(stale, ignore_errors=True)
        columns = load_columns()
        result = fine_tune(trainee, columns, make_loss, settings, work_dir)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}.", suffix=".tmp"))
        try:
            with transformers_quietly():
                result.model.save(str(tmp), create_model_card=False)
            summary = {**identity, **result.summary(), "rows": len(next(iter(columns.values()))),
                       "columns": list(columns)}
            (tmp / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    st = require("sentence_transformers", "eval", "a fine-tune before scoring embeddings")
    with transformers_quietly():
        trained = st.SentenceTransformer(str(folder), device=str(model.device))
    trained.max_seq_length = scoring_length  # it saved the length it trained at; it scores at the task's
    return CachedFineTune(trained, folder, json.loads((folder / SUMMARY).read_text()), reused)

"""GLUE: each task's files, columns, labels, metrics and fine-tuning hyper-parameters, and the `glue` command.

Nothing is downloaded: the user brings a folder laid out as GLUE's standard download (`download_glue_data.py`):

    GLUE_DIR/CoLA/train.tsv, dev.tsv          GLUE_DIR/MNLI/train.tsv, dev_matched.tsv, dev_mismatched.tsv
    GLUE_DIR/SST-2/...  MRPC/...  QQP/...  STS-B/...  QNLI/...  RTE/...  WNLI/...

Every task is scored on its dev files, as papers report GLUE (the test labels are private). A task's score is
the mean of its metrics (MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched and
mismatched accuracy), and the GLUE average is the mean of the task scores, as on GLUE's leaderboard.

Hyper-parameters (`GlueTask.settings`): RoBERTa's published GLUE recipe (fairseq, examples/roberta/
README.glue.md): learning rate 1e-5 (RTE, STS-B: 2e-5), batch 32 on the large tasks and 16 on the small ones,
6% warmup then linear decay, weight decay 0.1, AdamW betas (0.9, 0.98), eps 1e-6, dropout 0.1, 10 epochs,
the best epoch taken. Two changes, for cost: 3 epochs on the four large tasks (MNLI, QNLI, QQP, SST-2; BERT's
3 epochs), and gradients clipped at 1.0. They were written for RoBERTa-base and -large; a small model
pretrained briefly usually wants a higher learning rate (`--learning_rate` overrides every task's).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder_train.errors import UserError
from encoder_train.finetune.loop import FinetuneSettings, Result, Source, finetune
from encoder_train.finetune.tasks import Task, TaskSpec, load_task, read_records


@dataclass(frozen=True)
class GlueTask:
    name: str  # as GLUE writes it
    folder: str  # the folder in GLUE's download
    spec: TaskSpec
    metrics: tuple[str, ...]
    settings: dict[str, Any]  # FinetuneSettings fields that differ from the defaults
    validation: tuple[str, ...] = ("dev.tsv",)

    @property
    def key(self) -> str:
        return normalise(self.name)


def normalise(name: str) -> str:
    """`SST-2`, `sst2`, `sst_2` -> `sst2`."""
    return "".join(c for c in name.lower() if c.isalnum())


ZERO_ONE = ("0", "1")
NLI2 = ("entailment", "not_entailment")
LARGE = {"epochs": 3, "batch_size": 32}  # MNLI, QNLI, QQP, SST-2
SMALL = {"epochs": 10, "batch_size": 16}

GLUE_TASKS: dict[str, GlueTask] = {t.key: t for t in (
    # CoLA's train.tsv and dev.tsv have no header row: source, label, the author's label, sentence.
    GlueTask("CoLA", "CoLA", TaskSpec(("sentence",), "label", "classification", ZERO_ONE,
                                      columns=("source", "label", "original_label", "sentence")),
             ("matthews",), {**SMALL, "learning_rate": 1e-5}),
    GlueTask("SST-2", "SST-2", TaskSpec(("sentence",), "label", "classification", ZERO_ONE),
             ("accuracy",), {**LARGE, "learning_rate": 1e-5}),
    GlueTask("MRPC", "MRPC", TaskSpec(("#1 String", "#2 String"), "Quality", "classification", ZERO_ONE),
             ("f1", "accuracy"), {**SMALL, "learning_rate": 1e-5}),
    GlueTask("QQP", "QQP", TaskSpec(("question1", "question2"), "is_duplicate", "classification", ZERO_ONE),
             ("f1", "accuracy"), {**LARGE, "learning_rate": 1e-5}),
    GlueTask("STS-B", "STS-B", TaskSpec(("sentence1", "sentence2"), "score", "regression"),
             ("pearson", "spearman"), {**SMALL, "learning_rate": 2e-5}),
    GlueTask("MNLI", "MNLI", TaskSpec(("sentence1", "sentence2"), "gold_label", "classification",
                                      ("entailment", "neutral", "contradiction")),
             ("accuracy",), {**LARGE, "learning_rate": 1e-5}, ("dev_matched.tsv", "dev_mismatched.tsv")),
    GlueTask("QNLI", "QNLI", TaskSpec(("question", "sentence"), "label", "classification", NLI2),
             ("accuracy",), {**LARGE, "learning_rate": 1e-5}),
    GlueTask("RTE", "RTE", TaskSpec(("sentence1", "sentence2"), "label", "classification", NLI2),
             ("accuracy",), {**SMALL, "learning_rate": 2e-5}),
    GlueTask("WNLI", "WNLI", TaskSpec(("sentence1", "sentence2"), "label", "classification", ZERO_ONE),
             ("accuracy",), {**SMALL, "learning_rate": 1e-5}),
)}


def glue_task(name: str) -> GlueTask:
    """The GLUE task called `name` (any case, with or without the hyphen), or a sentence saying there is none."""
    task = GLUE_TASKS.get(normalise(name))
    if task is None:
        raise UserError(f"--task {name!r} is not a GLUE task ({', '.join(t.name for t in GLUE_TASKS.values())}); "
                        "for your own task leave --task out and choose the scores with --metric.")
    return task


def spec_for(task: GlueTask, train_file: Path) -> TaskSpec:
    """GLUE's columns, or, for the same task saved with the usual names (sentence1/sentence2/label, as the
    Hugging Face copy has them), those: whichever the training file's header holds."""
    markers = (*task.spec.text_fields, task.spec.label_field)
    header = read_records(train_file, "--train_file", task.spec.columns, markers, limit=1).columns
    if set(task.spec.text_fields) | {task.spec.label_field} <= set(header):
        return task.spec
    return dataclasses.replace(task.spec, text_fields=None, label_field=None, columns=None)


def find_tasks(data_dir: Path, wanted: list[str] | None) -> list[tuple[GlueTask, Path]]:
    """The GLUE tasks in `data_dir` (folders named as GLUE's, in any case), in GLUE's order."""
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a folder; pass the folder of GLUE's download (with CoLA/, "
                        "SST-2/, ... inside).")
    folders = {normalise(p.name): p for p in data_dir.iterdir() if p.is_dir()}
    keys = [glue_task(w).key for w in wanted] if wanted else list(GLUE_TASKS)
    found = [(GLUE_TASKS[k], folders[k]) for k in keys if k in folders]
    if wanted:
        missing = [GLUE_TASKS[k].folder for k in keys if k not in folders]
        if missing:
            raise UserError(f"--data_dir {data_dir} has no {missing[0]} folder; pass the folder of GLUE's download, "
                            "or leave that task out of --tasks.")
    if not found:
        raise UserError(f"--data_dir {data_dir} holds none of GLUE's task folders "
                        f"({', '.join(t.folder for t in GLUE_TASKS.values())}); pass the folder of GLUE's download.")
    return found


def task_files(task: GlueTask, folder: Path) -> tuple[Path, list[Path]]:
    train = folder / "train.tsv"
    validation = [folder / v for v in task.validation]
    for path in (train, *validation):
        if not path.is_file():
            raise UserError(f"{path} does not exist; a GLUE {task.name} folder holds train.tsv and "
                            f"{' and '.join(task.validation)}.")
    return train, validation


def own_rate(source: Source) -> dict[str, Any]:
    """GLUE's per-task learning rates were tuned for RoBERTa-base and -large; a narrower model (and one pretrained
    briefly) needs ~10-50x more, so below base's width the rate is searched for (`search_learning_rate`)."""
    return {"learning_rate": None} if source.dims.hidden_size < 768 else {}


def run_glue(source: Source, data_dir: Path, output_dir: Path, overrides: dict[str, Any],
             wanted: list[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune on every GLUE task found in `data_dir`; prints a table, returns the summary."""
    tasks = find_tasks(Path(data_dir), wanted)
    results: list[tuple[GlueTask, Result]] = []
    for task, folder in tasks:
        train, validation = task_files(task, folder)
        loaded = load_task(train, validation, spec=spec_for(task, train), name=task.name)
        settings = FinetuneSettings(**{**task.settings, **own_rate(source), **overrides})
        rate = "searched for" if settings.learning_rate is None else f"{settings.learning_rate:g}"
        print(f"== {task.name}: learning rate {rate}, batch {settings.batch_size}, "
              f"{settings.epochs} epochs, {settings.num_seeds} seed(s)", flush=True)
        results.append((task, finetune(source, loaded, task.metrics, settings, Path(output_dir) / task.folder,
                                       overwrite=overwrite)))
    print(table(results))
    summary = {
        "average": sum(r.score for _, r in results) / len(results),
        "tasks": {t.name: {"score": r.score, "score_std": r.score_std, "metrics": r.metrics, "std": r.std}
                  for t, r in results},
        "seeds": results[0][1].to_dict()["seeds"],
        "source": source.origin,
    }
    (Path(output_dir) / "glue.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def table(results: list[tuple[GlueTask, Result]]) -> str:
    """| task | metrics (x100, mean +- std over seeds) | score |, then the GLUE average."""
    seeds = len(results[0][1].seeds)
    lines = ["| task | metrics (x100" + (f", mean +- std over {seeds} seeds" if seeds > 1 else "") + ") | score |",
             "|---|---|---:|"]
    for task, r in results:
        shown = ", ".join(f"{k} {100 * v:.1f}" + (f" +- {100 * r.std[k]:.1f}" if seeds > 1 else "")
                          for k, v in r.metrics.items())
        lines.append(f"| {task.name} | {shown} | {100 * r.score:.1f} |")
    average = sum(r.score for _, r in results) / len(results)
    lines.append(f"| GLUE average ({len(results)} task{'s' * (len(results) > 1)}) | | {100 * average:.1f} |")
    return "\n".join(lines)


def resolve_task(train_file: str | Path, validation_files: list[str], test_file: str | None, task_name: str | None,
                 text_fields: list[str] | None, label_field: str | None, regression: bool,
                 metric: list[str] | None) -> tuple[Task, tuple[str, ...], dict[str, Any]]:
    """`finetune`'s task: read with a GLUE task's columns, labels and metrics when --task names one, else with
    the flags; returns the task, its metrics, and the hyper-parameters the task brings."""
    if text_fields is not None and not 1 <= len(text_fields) <= 2:
        raise UserError(f"--text_fields takes one column, or two for a sentence pair; got {len(text_fields)} "
                        f"({', '.join(text_fields)}).")
    fields = tuple(text_fields) if text_fields else None
    if task_name is None:
        spec = TaskSpec(fields, label_field, "regression" if regression else None)
        task = load_task(train_file, validation_files, test_file, spec)
        default = ("pearson", "spearman") if task.labels.kind == "regression" else ("accuracy",)
        return task, tuple(metric) if metric else default, {}
    glue = glue_task(task_name)
    if regression and glue.spec.kind != "regression":
        raise UserError(f"--regression contradicts --task {task_name}, a classification task; leave one out.")
    spec = spec_for(glue, Path(train_file))
    if fields or label_field:
        spec = dataclasses.replace(spec, text_fields=fields or spec.text_fields,
                                   label_field=label_field or spec.label_field)
    task = load_task(train_file, validation_files, test_file, spec, name=glue.name)
    return task, tuple(metric) if metric else glue.metrics, dict(glue.settings)

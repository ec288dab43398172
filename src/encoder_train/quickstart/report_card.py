"""The demo's last stage: the report card of its model against the same model untrained, on the offline suite.

    work/eval/offline.yaml, docstrings/, sts/, ...   the offline suite and its data (`encoder-train eval-data`)
    work/eval/demo.yaml                              `heldout` (mlm on the demo's own held-out shards at 15%), then
                                                     the offline suite's tasks zero-shot (FINE_TUNE_KEYS left out);
                                                     paths relative to the file, as in any suite
    work/report/untrained.pt                         the untrained model: the demo's model as training's step 0 made
                                                     it (its config's seed), no training state
    work/report/report.json, report.md               `encoder-train eval`'s report card of demo and untrained

It runs `encoder-train eval`'s runner as a user would (the same command is printed), so its report skips every
(model, task) pair it holds already: a rerun of the demo reprints the card, and a demo stopped here continues it.
Without the `eval` extra (sentence-transformers) only the held-out task runs, and the stage says how to add it.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from encoder_train import checkpoint
from encoder_train.errors import install_hint
from encoder_train.model import MaskedLM, ModelDims

HELD_OUT = "heldout"  # the mlm task's name in the demo's suite
# The offline tasks' fine-tune keys (retrieval, sts), left out of the demo's suite: zero-shot numbers in seconds,
# where a fine-tune of each model takes minutes on two CPU cores.
FINE_TUNE_KEYS = ("train_file", "train_max_length", "epochs", "learning_rate", "train_batch_size", "loss",
                  "mini_batch_size", "scale", "warmup_ratio", "seed")
UNTRAINED_KEYS = ("dims", "tokenizer", "config")  # a model checkpoint's keys beside its weights (state.load_trained)


@dataclass(frozen=True)
class Card:
    """What the stage made: the report's folder, the suite it ran, and the report's results."""

    report_dir: Path
    suite: Path
    results: dict[str, dict[str, dict[str, Any]]]  # report.json's results: model -> task -> metric -> value
    failure: str | None  # a pair that failed (one sentence), the others kept
    skipped_tasks: str | None  # why the suite's embedding tasks did not run (no sentence-transformers), or None


def write_untrained(trained_checkpoint: Path, seed: int, path: Path) -> Path:
    """A checkpoint of the demo's model as training initialised it (torch.manual_seed(seed), then MaskedLM(dims), as
    train.build_state does): its weights, shape, tokenizer and config, at step 0. It holds no optimizer or data
    position, so it evaluates and exports but does not resume. Written once; a file already there is kept."""
    if path.is_file():
        return path
    state = checkpoint.load(trained_checkpoint, flag="--checkpoint")
    with torch.random.fork_rng():  # the demo's own random stream goes on as before
        torch.manual_seed(seed)
        weights = MaskedLM(ModelDims(**state["dims"])).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    return checkpoint.save_as({"model": weights, "step": 0, "tokens_seen": 0,
                               **{k: state[k] for k in UNTRAINED_KEYS}}, path)


def write_suite(eval_dir: Path, held_out: Path, tokenizer: Path, max_length: int, embeddings: bool) -> Path:
    """eval_dir/demo.yaml: the held-out mlm task, then (with `embeddings`) the offline suite's tasks, whose data
    `write_offline_data` writes beside it. Rewritten each run: it is made from the demo's files, not edited."""
    from encoder_train.evaluation.offline import write_offline_data

    tasks: dict[str, Any] = {HELD_OUT: {
        "kind": "mlm", "data_dir": _relative(held_out, eval_dir), "tokenizer": _relative(tokenizer, eval_dir),
        "mask_rate": 0.15, "max_length": max_length}}
    if embeddings:
        offline = write_offline_data(eval_dir).suite  # kept as it is when a run before wrote it
        for name, task in yaml.safe_load(offline.read_text(encoding="utf-8"))["tasks"].items():
            tasks[name] = {k: v for k, v in task.items() if k not in FINE_TUNE_KEYS}
    path = eval_dir / "demo.yaml"
    header = ("# The demo's report card (quickstart/report_card.py writes this file): `heldout` is the masked-LM "
              "loss on the demo's\n# held-out rows; the others are offline.yaml's tasks (beside it: its comments say "
              "what each measures), zero-shot:\n# their fine-tunes take minutes per model on two CPU cores. "
              "`encoder-train eval --suite offline.yaml ...` runs them too.\n")
    path.write_text(header + yaml.safe_dump({"tasks": tasks}, sort_keys=False, width=120), encoding="utf-8")
    return path


def run_card(trained_checkpoint: Path, seed: int, root: Path, held_out: Path, tokenizer: Path, max_length: int,
             say: Callable[[str], None] = print) -> Card:
    """Evaluate `demo` (the trained checkpoint) and `untrained` on the demo's suite into root/report."""
    from encoder_train.evaluation.models import model_rows
    from encoder_train.evaluation.runner import failures_sentence, run_suite
    from encoder_train.evaluation.suite import load_suite

    embeddings = importlib.util.find_spec("sentence_transformers") is not None
    report_dir = root / "report"
    untrained = write_untrained(trained_checkpoint, seed, report_dir / "untrained.pt")
    suite_path = write_suite(root / "eval", held_out, tokenizer, max_length, embeddings)
    specs = [f"demo={trained_checkpoint}", f"untrained={untrained}"]
    say("the same as: encoder-train eval --suite " + shlex.quote(str(suite_path)) + "".join(
        f" --model {shlex.quote(s)}" for s in specs) + f" --output_dir {shlex.quote(str(report_dir))}")
    suite, rows = load_suite(suite_path), model_rows(specs)
    report = run_suite(suite, rows, report_dir, say=say)
    skipped = None if embeddings else (f"the retrieval and sts tasks embed texts with sentence-transformers, which "
                                       f"is not installed; {install_hint('eval')} adds them")
    return Card(report_dir, suite_path, report.data["results"], failures_sentence(report, rows, suite), skipped)


def reading(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """What the card says, a line per task both models finished: the held-out loss against the untrained one's, and
    each embedding task's first number, trained against untrained."""
    demo, untrained = results.get("demo", {}), results.get("untrained", {})
    lines, embeddings_lag = [], False
    for task, metrics in demo.items():
        if task not in untrained:
            continue
        key = "loss" if task == HELD_OUT else next(iter(metrics))
        ours, theirs = metrics[key], untrained[task][key]
        better = ours < theirs if key == "loss" else ours > theirs
        embeddings_lag |= task != HELD_OUT and not better
        lines.append(f"{task}: {key} {ours:.4f} trained, {theirs:.4f} untrained: "
                     + ("training helped" if better else "no better than untrained"))
    if embeddings_lag:
        lines.append("an encoder this small, trained for minutes, learns to predict words before its mean-pooled "
                     "states tell texts apart: random weights still pass on which tokens a text holds, which these "
                     "tasks reward; the papers' suite (configs/eval/papers.yaml) scores models trained for days")
    return lines


def _relative(path: Path, start: Path) -> str:
    """`path` as a suite in folder `start` names it: relative, so that the work folder can move."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()

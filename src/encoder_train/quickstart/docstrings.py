"""The demo's downstream task, built at run time from its corpus: which part of the standard library does a
docstring come from?

The corpus (corpus.py) writes each standard-library module as one paragraph of docstrings, each starting with
the dotted name it documents: `json.JSONDecoder.decode: Return the Python representation of ...`. The label
is the top-level package of that name (`json`); the text is the docstring without the name, so the answer
has to come from what the docstring says. The `CLASSES` packages with the most docstrings are kept, each cut
to as many docstrings as the smallest of them has (chance is 1 / CLASSES), and a fifth of each is held out.

The docstrings are also in the text the demo pretrained on (names included): the question is what
pretraining on them gives a classifier, not how it transfers to text it never saw.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder_train.finetune.loop import FinetuneSettings, finetune, source_from_checkpoint, untrained
from encoder_train.finetune.tasks import load_task

CLASSES = 6
MIN_PER_CLASS = 40  # fewer (a corpus cut short by --corpus_bytes) and the stage is skipped
MIN_WORDS = 4  # "Return self+value." says nothing about where it comes from
TITLE = re.compile(r"^([A-Za-z_]\w*)(?:\.\w+)*: ")


@dataclass(frozen=True)
class DocstringTask:
    train: Path
    validation: Path
    classes: tuple[str, ...]
    per_class: int  # docstrings of each class, before the split


def docstrings_by_package(corpus: Path) -> dict[str, list[str]]:
    """Every docstring of the corpus, without its name, grouped by the top-level package it documents."""
    found: dict[str, list[str]] = defaultdict(list)
    for paragraph in corpus.read_text(encoding="utf-8").split("\n\n"):
        first = TITLE.match(paragraph)
        if first is None:
            continue  # a help() topic
        package = first.group(1)
        starts = re.compile(rf"^{re.escape(package)}(?:\.\w+)*: ")  # a new docstring of this module
        current: list[str] = []
        for line in paragraph.splitlines():
            start = starts.match(line)
            if start:
                _keep(found[package], current)
                current = [line[start.end():]]
            else:
                current.append(line)
        _keep(found[package], current)
    return found


def _keep(into: list[str], lines: list[str]) -> None:
    text = " ".join(" ".join(lines).split())
    if len(text.split()) >= MIN_WORDS:
        into.append(text)


def write_task(corpus: Path, folder: Path, seed: int = 0) -> DocstringTask | None:
    """train.jsonl and dev.jsonl ({"text", "label"}) in `folder`; None when the corpus has too few docstrings."""
    found = docstrings_by_package(corpus)
    ranked = sorted(found, key=lambda p: (-len(found[p]), p))[:CLASSES]
    classes = tuple(sorted(p for p in ranked if len(found[p]) >= MIN_PER_CLASS))
    if len(classes) < 2:
        return None
    per_class = min(len(found[p]) for p in classes)
    rng = random.Random(seed)
    train, dev = [], []
    for package in classes:
        texts = sorted(found[package])
        rng.shuffle(texts)
        texts = texts[:per_class]
        held = per_class // 5
        dev += [{"text": t, "label": package} for t in texts[:held]]
        train += [{"text": t, "label": package} for t in texts[held:]]
    rng.shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("dev.jsonl", dev)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return DocstringTask(folder / "train.jsonl", folder / "dev.jsonl", classes, per_class)


# The demo's fine-tuning, the same for the trained and the untrained model: ~870 docstrings, 5 epochs of 28
# steps. A small model takes a higher learning rate than RoBERTa's GLUE recipe (1e-5..2e-5, for base sizes).
# Tried on the demo's checkpoint (held-out accuracy, trained / untrained): 2e-4 x 4 epochs 0.458 / 0.338;
# 5e-4 x 5 epochs 0.755 / 0.699; 1e-3 x 5 epochs 0.755 / 0.491. 5e-4 is the fairer to the untrained model.
DEMO_SETTINGS = FinetuneSettings(learning_rate=5e-4, batch_size=32, epochs=5, warmup_ratio=0.1, max_length=128)
FINETUNES = ("pretrained", "untrained")  # in this order: the pretrained one, the point of the demo, first


def run_demo_stage(work: Path, checkpoint_path: Path, seed: int, say: Callable[[str], None] = print,
                   settings: FinetuneSettings = DEMO_SETTINGS) -> dict[str, Any] | None:
    """Build the task from work/corpus.txt, fine-tune the demo's checkpoint and the same model untrained on it,
    print both accuracies. Each fine-tune's numbers go into work/finetune/results.json as it finishes: a later
    run skips the fine-tunes found there (reprinting them), so a stopped stage continues with the one left."""
    folder = work / "finetune"
    kept = folder / "results.json"
    results = kept_results(work, checkpoint_path)
    reused = [name for name in FINETUNES if name in results]
    if len(reused) == len(FINETUNES):
        say(f"      fine-tuned before ({kept}):")
        _report(results, say)
        return results
    task_files = write_task(work / "corpus.txt", folder / "data", seed)  # the same task again: seeded
    if task_files is None:
        say(f"      skipped: {work / 'corpus.txt'} holds too few docstrings (a corpus cut short by --corpus_bytes); "
            "the full corpus has them.")
        return None
    source = source_from_checkpoint(checkpoint_path)
    task = load_task(task_files.train, [task_files.validation])
    say(f"      task: which of {len(task_files.classes)} packages ({', '.join(task_files.classes)}) a docstring "
        f"comes from;\n      {len(task.train.texts)} training and {len(task.validation[0].texts)} held-out docstrings "
        f"in {folder / 'data'}")
    quiet = lambda message: None  # noqa: E731 - the stage prints its own summary
    results |= {"classes": list(task_files.classes), "chance": 1 / len(task_files.classes),
                "train_examples": len(task.train.texts), "validation_examples": len(task.validation[0].texts)}
    for name in FINETUNES:
        if name in reused:
            say(f"      {name} model: fine-tuned before, kept in {kept}")
            continue
        t0 = time.perf_counter()
        try:
            say(f"      fine-tuning the {name} model in {folder / name}")
            start = source if name == "pretrained" else untrained(source, seed)
            result = finetune(start, task, ("accuracy",), settings, folder / name, overwrite=True, say=quiet,
                              label=name)
        except KeyboardInterrupt:  # Ctrl-C, or the demo's SIGTERM: say what is kept, then stop as asked
            done = [n for n in FINETUNES if n in results]
            say(f"      stopped while fine-tuning the {name} model"
                + (f"; the {done[0]} model's fine-tune is kept in {kept}" if done else ""))
            raise
        best = result.seeds[0]
        results[name] = {"accuracy": best.metrics["accuracy"], "epoch": best.epoch, "checkpoint": str(best.checkpoint)}
        results["seconds"] = results.get("seconds", 0.0) + time.perf_counter() - t0
        _write_json(kept, results)
    _report(results, say)
    return results


def kept_results(work: Path, checkpoint_path: Path) -> dict[str, Any]:
    """What work/finetune/results.json holds of fine-tunes that started from `checkpoint_path` (each of FINETUNES
    found in it is done); only that path when the file is missing, damaged or of another checkpoint."""
    kept = work / "finetune" / "results.json"
    try:
        results = json.loads(kept.read_text())
    except (OSError, ValueError):  # none yet, or damaged: the fine-tunes are done again
        results = {}
    return results if isinstance(results, dict) and results.get("from") == str(checkpoint_path) else {
        "from": str(checkpoint_path)}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Written aside, then renamed: a stop mid-write leaves the previous file whole."""
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_text(json.dumps(data, indent=2) + "\n")
    aside.replace(path)


def _report(results: dict[str, Any], say: Callable[[str], None]) -> None:
    for name, shown in (("untrained", "untrained model:"), ("pretrained", "trained model:  ")):
        r = results[name]
        say(f"      {shown} held-out accuracy {r['accuracy']:.3f} (best epoch {r['epoch']}; chance "
            f"{results['chance']:.3f})")

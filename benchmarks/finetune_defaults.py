"""Fine-tuning with the defaults, before and after the learning-rate search: accuracy against the majority class.

Two tasks built from the demo's corpus (the standard library's docstrings): A, which of the six packages with the
most docstrings one comes from (the demo's task); B, which of the next four. For each pretrained checkpoint and
task: the old defaults (RoBERTa-base's GLUE values: learning rate 2e-5, 3 epochs, 6% warmup) and the new ones (the
same, the rate searched for on held-out training examples). Prints a table with the machine.

    python benchmarks/finetune_defaults.py --corpus runs/demo/corpus.txt \
        --checkpoint demo=runs/demo/checkpoints/checkpoint_00000400.pt --checkpoint tiny=.../checkpoint_00000600.pt
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import random
import statistics
import tempfile
from pathlib import Path

import torch

from encoder_train.finetune.loop import FinetuneSettings, finetune, source_from_checkpoint
from encoder_train.finetune.tasks import load_task
from encoder_train.quickstart.docstrings import docstrings_by_package


def write_task(corpus: Path, folder: Path, ranks: range, seed: int = 0) -> Path:
    """train.jsonl / dev.jsonl in `folder`: the packages ranked `ranks` by docstring count, balanced, 1/5 held out."""
    found = docstrings_by_package(corpus)
    ranked = sorted(found, key=lambda p: (-len(found[p]), p))
    classes = [ranked[i] for i in ranks]
    per_class = min(len(found[p]) for p in classes)
    rng, train, dev = random.Random(seed), [], []
    for package in classes:
        texts = sorted(found[package])
        rng.shuffle(texts)
        held = per_class // 5
        dev += [{"text": t, "label": package} for t in texts[:held]]
        train += [{"text": t, "label": package} for t in texts[held:per_class]]
    rng.shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("dev.jsonl", dev)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        tasks = {"A (6 packages)": write_task(args.corpus, Path(work) / "a", range(0, 6)),
                 "B (next 4)": write_task(args.corpus, Path(work) / "b", range(6, 10))}
        for spec in args.checkpoint:
            name, path = spec.split("=", 1)
            source = source_from_checkpoint(path)
            for task_name, folder in tasks.items():
                task = load_task(folder / "train.jsonl", [folder / "dev.jsonl"])
                labels = task.validation[0].labels
                majority = max(labels.count(c) for c in set(labels)) / len(labels)
                for setting, lr in (("old: 2e-5", 2e-5), ("new: searched", None)):
                    settings = FinetuneSettings(learning_rate=lr, max_length=128, seed=0, num_seeds=args.seeds,
                                                progress="lines", log_interval=1 << 30)
                    with contextlib.redirect_stderr(io.StringIO()):
                        result = finetune(source, task, ("accuracy",), settings, Path(work) / "out", overwrite=True,
                                          say=lambda _: None)
                    accs = [s.metrics["accuracy"] for s in result.seeds]
                    rows.append((name, f"{source.dims.hidden_size}x{source.dims.num_layers}", task_name, setting,
                                 f"{result.learning_rate:g}", statistics.fmean(accs),
                                 statistics.stdev(accs) if len(accs) > 1 else 0.0, majority))
                    print(rows[-1], flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.seeds} seed(s)")
    print("| checkpoint | width x layers | task | defaults | learning rate | dev accuracy | majority class |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, task_name, setting, lr, acc, std, majority in rows:
        spread = f" +- {std:.3f}" if args.seeds > 1 else ""
        print(f"| {name} | {shape} | {task_name} | {setting} | {lr} | {acc:.3f}{spread} | {majority:.3f} |")


if __name__ == "__main__":
    main()

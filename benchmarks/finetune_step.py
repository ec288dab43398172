"""What does the demo's fine-tuning stage cost, in pretraining steps? One thread's CPU time per step of each.

On a machine shared with other jobs, wall-clock time says more about the neighbours than about the code;
the CPU time of a single thread barely depends on them. This compares, on the demo's own artefacts, a
pretraining step (32 rows of 128 tokens, bf16, the sparse MLM head, AdamW) with a fine-tuning step of the
demo's stage 6 (32 docstrings, bucketed by length, bf16, the classification head, AdamW), so that the
stage's cost can be read off the demo's training speed on any machine:

    encoder-train demo                                  # writes runs/demo, including finetune/data
    python benchmarks/finetune_step.py --workdir runs/demo

Prints each step's CPU seconds, their ratio, and the stage's cost in pretraining steps.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import torch
import torch.nn.functional as F
from host import cpu_name

from encoder_train.config import TrainingConfig
from encoder_train.data.loader import collate as mlm_collate
from encoder_train.data.shards import ShardReader, scan_shards
from encoder_train.finetune.classifier import SequenceClassifier
from encoder_train.finetune.loop import collate, encode, training_batches
from encoder_train.finetune.tasks import load_task
from encoder_train.optimizers import build_optimizer
from encoder_train.quickstart.docstrings import DEMO_SETTINGS
from encoder_train.state import load_trained


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def per_step(step, batches) -> float:
    step(batches[0])  # warm-up
    start = cpu_seconds()
    for b in batches[1:]:
        step(b)
    return (cpu_seconds() - start) / (len(batches) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="a finished demo's folder")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    path = sorted((work / "checkpoints").glob("checkpoint_*.pt"))[-1]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    adamw = TrainingConfig(learning_rate=1e-4)

    trained = load_trained(path, torch.device("cpu"))
    model = trained.model.train()
    optimizer = build_optimizer(model, adamw, torch.device("cpu"))
    reader = ShardReader(scan_shards(work / "data" / "train", model.dims.max_tokens)[0])

    def pretraining_step(i: int) -> None:
        b = mlm_collate(list(reader.rows(32 * i, 32)), trained.spec, 0, 32 * i)
        with autocast:
            loss = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    task = load_task(work / "finetune" / "data" / "train.jsonl", [work / "finetune" / "data" / "dev.jsonl"])
    data = encode(task.train, trained.tokenizer, DEMO_SETTINGS.max_length, regression=False)
    classifier = SequenceClassifier(load_trained(path, torch.device("cpu")).model, task.labels.num_outputs).train()
    optimizer2 = build_optimizer(classifier, adamw, torch.device("cpu"))
    batches = training_batches(data, DEMO_SETTINGS.batch_size, torch.Generator().manual_seed(0))

    def finetuning_step(index: list[int]) -> None:
        ids, mask = collate([data.ids[i] for i in index], trained.spec.pad_id)
        with autocast:
            logits = classifier(ids, mask)
        F.cross_entropy(logits.float(), data.labels[index]).backward()
        optimizer2.step()
        optimizer2.zero_grad(set_to_none=True)

    n = min(args.steps, len(batches))
    pretraining = per_step(pretraining_step, list(range(n + 1)))
    finetuning = per_step(finetuning_step, batches[: n + 1])
    steps = 2 * DEMO_SETTINGS.epochs * len(batches)  # the trained and the untrained model
    print(f"{cpu_name()}, one thread, {path}")
    print("| step | CPU s |\n|---|---:|")
    print(f"| pretraining (32 x 128 tokens) | {pretraining:.3f} |")
    print(f"| fine-tuning (32 docstrings) | {finetuning:.3f} |")
    print(f"ratio {finetuning / pretraining:.3f}; stage 6 = {steps} fine-tuning steps = about "
          f"{steps * finetuning / pretraining:.0f} pretraining steps (the demo trains 400)")


if __name__ == "__main__":
    main()

"""Equal quality: held-out MLM loss of both sides after the same steps on the same rows.

The small model trains on the synthetic rows with each trainer, then both are evaluated on the same
held-out rows with the same masks (encoder-train's evaluation batches). With several seeds, the
spread between the seeds of one trainer is the noise a difference between the trainers is measured
against.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from hf_trainer import run_hf
from ours import run_encoder_train
from synthetic import make_rows, rows_in_loader_order, unigram_entropy, write_shard, write_tokenizer
from workload import SEED, SIZES, Workload

from encoder_train.batch import IGNORE_INDEX
from encoder_train.data.shards import scan_shards
from encoder_train.devices import autocast_for
from encoder_train.evaluate import eval_batches, evaluate
from encoder_train.state import load_trained


@torch.no_grad()
def hf_heldout(model, val_dir: Path, spec, batch: int, device: torch.device, precision: str) -> dict[str, float]:
    """Loss and accuracy of the HF model on encoder-train's evaluation batches (same rows, same masks)."""
    model.eval()
    shards = scan_shards(val_dir, 10**9)
    loss_sum, correct, predicted = 0.0, 0, 0
    for b in eval_batches(shards, spec, batch, None):
        b = b.to(device)
        with autocast_for(precision, device):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits  # (B, T, V)
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, b.predict_positions).float()  # (N, V)
        target = b.labels.reshape(-1).index_select(0, b.predict_positions)
        assert bool((target != IGNORE_INDEX).all())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits[:, : spec.vocab_size].argmax(-1) == target).sum())
        predicted += b.num_predicted
    return {"loss": loss_sum / predicted, "accuracy": correct / predicted, "tokens": predicted}


def quality(work: Path, steps: int, precision: str, device: torch.device, hf_workers: int, verbose: bool,
            seeds: int = 1) -> str:
    """Small model, `steps` steps of both on the same rows; held-out loss on the same masked rows. With
    several seeds (initial weights, dropout, masks, row order), the spread between seeds of one trainer is
    the run-to-run noise that a difference between the trainers is measured against."""
    tokenizer = write_tokenizer(work / "tokenizer_quality.json", SIZES["small"].vocab)
    n_rows = steps * 32
    data_dir = write_shard(work / "quality_train", make_rows(n_rows, 128, SIZES["small"].vocab, seed=SEED))
    val_dir = write_shard(work / "quality_val", make_rows(16 * 32, 128, SIZES["small"].vocab, seed=SEED + 1))
    shards = scan_shards(val_dir, 128)
    autocast = autocast_for(precision, device)
    losses: dict[str, list[float]] = {"encoder-train": [], "HF Trainer": []}
    lines = []
    for seed in range(seeds):
        # One untimed step: the timing of these runs is a by-product, the losses are what count.
        w = Workload(SIZES["small"], 128, precision, 1, steps - 1, lr=5e-4, lr_warmup=max(1, steps // 10), seed=seed)
        rows = rows_in_loader_order(data_dir, w.seq_len, n_rows, seed)
        _, checkpoint = run_encoder_train(work / f"quality_ours_{seed}", data_dir, tokenizer, w, verbose)
        trained = load_trained(checkpoint, device)
        ours = evaluate(trained.model, shards, trained.spec, batch_size=w.batch, device=device, autocast=autocast)
        _, model = run_hf(work / f"quality_hf_{seed}", rows, tokenizer, w, device, hf_workers, verbose)
        hf = hf_heldout(model, val_dir, trained.spec, w.batch, device, precision)
        losses["encoder-train"].append(ours["loss"])
        losses["HF Trainer"].append(hf["loss"])
        lines.append(f"| {seed} | {ours['loss']:.4f} | {ours['accuracy']:.4f} | "
                     f"{hf['loss']:.4f} | {hf['accuracy']:.4f} |")
        print(f"  quality seed {seed}: encoder-train {ours['loss']:.4f}, HF {hf['loss']:.4f}", flush=True)

    def spread(xs: list[float]) -> str:
        mean = sum(xs) / len(xs)
        if len(xs) < 2:
            return f"{mean:.4f}"
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        return f"{mean:.4f} +- {std:.4f} (sd over {len(xs)} seeds)"

    return "\n".join([
        f"equal quality (small, 128, {precision}, {steps} steps of 32 rows, lr 5e-4, lr warm-up {max(1, steps // 10)}; "
        f"{ours['tokens']} held-out predictions, same masks for both; a model knowing only word frequencies "
        f"scores {unigram_entropy(SIZES['small'].vocab):.2f}):",
        "",
        "| seed | encoder-train loss | accuracy | HF Trainer loss | accuracy |",
        "|---:|---:|---:|---:|---:|",
        *lines,
        "",
        f"held-out MLM loss: encoder-train {spread(losses['encoder-train'])}, "
        f"HF Trainer {spread(losses['HF Trainer'])}",
    ])

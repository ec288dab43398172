"""Equal quality: held-out MLM loss of both sides after the same steps on the same rows.

The small model (RoBERTa's, or the modern family's) trains on the synthetic rows with each trainer,
then both are evaluated on the same held-out rows with the same masks (encoder-train's evaluation
batches). With several seeds, the spread between the seeds of one trainer is the noise a difference
between the trainers is measured against. `family_comparison` trains encoder-train alone on a
RoBERTa-style and a ModernBERT-style model of about the same parameter count, on the same rows, for
information.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from hf_trainer import run_hf
from ours import run_encoder_train
from synthetic import make_rows, rows_in_loader_order, unigram_entropy, write_shard, write_tokenizer
from workload import SEED, SIZES, Size, Workload

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
            seeds: int = 1, size: Size = SIZES["small"]) -> str:
    """Small model, `steps` steps of both on the same rows; held-out loss on the same masked rows. With
    several seeds (initial weights, dropout, masks, row order), the spread between seeds of one trainer is
    the run-to-run noise that a difference between the trainers is measured against."""
    tokenizer = write_tokenizer(work / "tokenizer_quality.json", size.vocab)
    n_rows = steps * 32
    data_dir = write_shard(work / "quality_train", make_rows(n_rows, 128, size.vocab, seed=SEED))
    val_dir = write_shard(work / "quality_val", make_rows(16 * 32, 128, size.vocab, seed=SEED + 1))
    shards = scan_shards(val_dir, 128)
    autocast = autocast_for(precision, device)
    runs = "quality" if size.family == "roberta" else f"quality_{size.label}"
    losses: dict[str, list[float]] = {"encoder-train": [], "HF Trainer": []}
    lines = []
    for seed in range(seeds):
        # One untimed step: the timing of these runs is a by-product, the losses are what count.
        w = Workload(size, 128, precision, 1, steps - 1, lr=5e-4, lr_warmup=max(1, steps // 10), seed=seed)
        rows = rows_in_loader_order(data_dir, w.seq_len, n_rows, seed)
        _, checkpoint = run_encoder_train(work / f"{runs}_ours_{seed}", data_dir, tokenizer, w, verbose)
        trained = load_trained(checkpoint, device)
        ours = evaluate(trained.model, shards, trained.spec, batch_size=w.batch, device=device, autocast=autocast)
        _, model = run_hf(work / f"{runs}_hf_{seed}", rows, tokenizer, w, device, hf_workers, verbose)
        hf = hf_heldout(model, val_dir, trained.spec, w.batch, device, precision)
        losses["encoder-train"].append(ours["loss"])
        losses["HF Trainer"].append(hf["loss"])
        lines.append(f"| {seed} | {ours['loss']:.4f} | {ours['accuracy']:.4f} | "
                     f"{hf['loss']:.4f} | {hf['accuracy']:.4f} |")
        print(f"  quality seed {seed}: encoder-train {ours['loss']:.4f}, HF {hf['loss']:.4f}", flush=True)

    return "\n".join([
        f"equal quality ({size.label}, 128, {precision}, {steps} steps of 32 rows, lr 5e-4, lr warm-up "
        f"{max(1, steps // 10)}; {ours['tokens']} held-out predictions, same masks for both; a model knowing only "
        f"word frequencies scores {unigram_entropy(size.vocab):.2f}):",
        "",
        "| seed | encoder-train loss | accuracy | HF Trainer loss | accuracy |",
        "|---:|---:|---:|---:|---:|",
        *lines,
        "",
        f"held-out MLM loss: encoder-train {spread(losses['encoder-train'])}, "
        f"HF Trainer {spread(losses['HF Trainer'])}",
    ])


# The family comparison: RoBERTa small against a ModernBERT-style model of its width, depth and heads whose
# GeGLU intermediate size (688) makes the parameter count the same (5.34M against 5.36M; 3.24M against 3.23M
# outside the embeddings). Each keeps its family's own settings (dropout 0.1 against none).
MATCHED_SIZES = [SIZES["small"], Size("small-688", 4, 256, 4, 688, 8192, (128,), family="modernbert")]


def family_comparison(work: Path, steps: int, precision: str, device: torch.device, verbose: bool,
                      seeds: int = 1, sizes: list[Size] = MATCHED_SIZES) -> str:
    """encoder-train only: models of about the same parameter count, `steps` steps each on the same rows with
    the same seeds, evaluated on the same held-out rows with the same masks. Information, not a check."""
    tokenizer = write_tokenizer(work / "tokenizer_quality.json", sizes[0].vocab)
    n_rows = steps * 32
    data_dir = write_shard(work / "quality_train", make_rows(n_rows, 128, sizes[0].vocab, seed=SEED))
    val_dir = write_shard(work / "quality_val", make_rows(16 * 32, 128, sizes[0].vocab, seed=SEED + 1))
    shards = scan_shards(val_dir, 128)
    autocast = autocast_for(precision, device)
    lines = []
    for size in sizes:
        losses, accuracies = [], []
        for seed in range(seeds):
            w = Workload(size, 128, precision, 1, steps - 1, lr=5e-4, lr_warmup=max(1, steps // 10), seed=seed)
            _, checkpoint = run_encoder_train(work / f"families_{size.label}_{seed}", data_dir, tokenizer, w, verbose)
            trained = load_trained(checkpoint, device)
            result = evaluate(trained.model, shards, trained.spec, batch_size=w.batch, device=device,
                              autocast=autocast)
            losses.append(result["loss"])
            accuracies.append(result["accuracy"])
            print(f"  families {size.label} seed {seed}: {result['loss']:.4f}", flush=True)
        d = trained.model.dims
        lines.append(
            f"| {size.label} ({d.num_layers} x {d.hidden_size}, intermediate {d.intermediate_size}, "
            f"{d.feed_forward}) | {trained.model.num_parameters():,} | "
            + " | ".join(f"{x:.4f}" for x in losses) + f" | {spread(losses, False)} | {spread(accuracies, False)} |"
        )
    return "\n".join([
        f"the families at about the same parameter count (encoder-train, 128, {precision}, {steps} steps of 32 rows, "
        f"lr 5e-4, lr warm-up {max(1, steps // 10)}, each family's own dropout; the same held-out rows and masks):",
        "",
        "| model | parameters | " + " | ".join(f"seed {s} loss" for s in range(seeds))
        + " | loss (mean +- sd) | accuracy |",
        "|---|---:|" + "---:|" * seeds + "---:|---:|",
        *lines,
    ])


def spread(xs: list[float], say_what: bool = True) -> str:
    """The mean, and with several values their standard deviation."""
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{mean:.4f}"
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return f"{mean:.4f} +- {std:.4f}" + (f" (sd over {len(xs)} seeds)" if say_what else "")

"""Training speed of encoder-train beside the Hugging Face Trainer, same model, same data, same machine.

    python benchmarks/speed.py                                   # small + base, bf16 + fp32
    python benchmarks/speed.py --quick                           # smoke run: small model, a few steps
    python benchmarks/speed.py --sizes small --repeats 3         # a shared machine: fastest of 3 per step
    python benchmarks/speed.py --sizes base --seq_lens 512 --batch_size 8   # a CPU with < 48 GB
    python benchmarks/speed.py --sizes --quality --quality_seeds 3          # equal quality only, with its noise
    python benchmarks/speed.py --family modernbert --sizes small            # the modern family against ModernBERT
    python benchmarks/speed.py --family modernbert --sizes base --batch_size 8   # ModernBERT-base, rows of 512
    python benchmarks/speed.py --sizes --compare_families --quality_seeds 3 # RoBERTa vs ModernBERT style, same size

What runs. For each (size, row length, precision) the script writes `.pt` shards and a word-level
tokenizer into a temp folder, then trains the same model dimensions on the same rows, 32 rows per
step (`--batch_size`), twice:

  encoder-train  `encoder_train.train.train(config)`, the config loaded from a small YAML file;
                 its own loader (default workers: inline on a CPU, 2 on a GPU), masking,
                 sparse MLM head, AdamW.
  HF Trainer     `transformers.Trainer` + `RobertaForMaskedLM` (attn_implementation="sdpa") +
                 `DataCollatorForLanguageModeling` (mlm_probability 0.15), as `run_mlm.py` would:
                 the rows without their padding (with `special_tokens_mask`, as the tokenizer gives
                 it), padded per batch to its longest row by the collator, logits over every position.

With `--family modernbert` both sides train the modern family instead (`model.family: modernbert`:
rotary positions, GeGLU, no biases, pre-LN, every 3rd layer global and a 128-token window elsewhere,
no dropout): encoder-train with that config key, the Trainer with `ModernBertForMaskedLM` built by
`encoder_train.hf.hf_config` from the same dimensions (SDPA attention, the window as a mask on
padded rows, logits over every position), the same collator, rows and settings. Sizes: small (RoBERTa
small's width, depth and heads; intermediate 384, 1.5 x hidden as in ModernBERT) and base
(ModernBERT-base: 22 x 768, 12 heads, intermediate 1152, vocabulary 50,368; rows of 512).

Both see the same rows in the same order: the HF dataset lists the rows in the order encoder-train's
loader reads them (`RowOrder`), and the Trainer reads it sequentially, so batch i holds the same 32
rows on both sides. Same optimiser settings (AdamW, beta2 0.98, eps 1e-6, weight decay 0.01 off
biases and LayerNorms, clip 1.0, linear schedule), same dropout, same precision: bf16 autocast with
fp32 weights, or fp32. Both run in this process with the same torch thread count.

How it is timed. The first W steps are warm-up (allocator, worker start, first-call overheads) and
are excluded; the next N steps are timed, each on its own. encoder-train logs every step
(`training.log_interval` 1): each metrics.jsonl record holds the tokens since the last record and
their tokens/s, whose quotient is that step's wall time (on CUDA the loop reads its clock just
before the sync of its logging, right after the per-step sync of its finiteness check). HF: a
`TrainerCallback` reads the clock at the end of every step (after a CUDA sync; the Trainer syncs
every step anyway, for its NaN filter of the loss). With `--repeats R` the sides run R times each,
alternating, and batch i's time is the fastest of its R runs: every run sees the same batches, so
this keeps, step by step, the run least slowed by other work on a shared machine. Real tokens are
the non-pad tokens of the N batches, identical on both sides (the HF count comes from the attention
masks its collator built, and is checked).

Useful FLOPs of a window (the same formula for both sides; padding, and logits at positions that
are not predicted, are work HF does that counts for nothing). For L layers, hidden H, feed-forward
F, vocabulary V, rows of real lengths n_r, and P predicted positions (mask probability x the
non-special tokens, 0.15 x (n_r - 2) per row), with fwd + bwd = 3 x fwd (the backward pass does two
matmuls per forward one):

    dense      6 * L * (4H^2 + 2HF) * sum_r n_r      q, k, v, out projections and the FFN
                                                     (GeGLU: 3HF, up to 2F for value and gate, down)
    attention 12 * L * H * sum_r n_r^2               per token, forward QK^T and AV are each
                                                     2 * n_r * H FLOPs: 4 n_r H, x3 for fwd + bwd
                                                     (a local layer of window W: n_r * min(n_r, W + 1))
    MLM head   6 * (H^2 + H*V) * P                   dense + decoder on predicted positions only

(6 x the non-embedding matmul weights per real token, plus attention over the real tokens of the
row, plus the head where a prediction is made; embeddings, LayerNorms, biases, softmax and the
optimiser are left out.) MFU = useful FLOP/s / the matmul rate measured on this machine in this run
for that precision: the fastest single 2048^3 matmul or matmul of the model's own FFN shape
(B*T x H @ H x F; GeGLU H x 2F), measured before and after every workload.

Data. Rows of real length uniform in [0.4 L, L] (about 30% padding overall, `<s>` first, `</s>` last,
pad id 1 after), ids 5..V-1 drawn from a Zipf law (rank^-1.1). Each row repeats a motif of 4 to 16
such words, so a model has something to learn beyond word frequencies (copying needs attention):
that makes `--quality`, held-out MLM loss of both after the same steps on the same rows, evaluated
on the same held-out rows with the same masks (encoder-train's evaluation batches), a real check.

Caveats: timings vary with the machine and its load; the header prints the machine. base at 512
tokens and 32 rows needs about 24 GB (encoder-train) and well over 30 GB (HF) of host memory on a
CPU, where attention with dropout materialises (B, heads, T, T) tensors; use `--batch_size 8` there.
"""

# The pieces are modules beside this file, for other benchmarks to import: workload.py (sizes, a
# workload, step timings), synthetic.py (the tokenizer and rows), ours.py (encoder-train's side),
# hf_trainer.py (the Trainer's side), mfu.py (useful FLOPs, matmul rates), quality.py (held-out loss);
# host.py names the machine. This file runs both sides per workload and prints the tables.

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from hf_trainer import run_hf
from host import cpu_name, usable_cores
from mfu import MatmulRates, useful_flops
from ours import run_encoder_train
from quality import family_comparison, quality
from synthetic import make_rows, rows_in_loader_order, write_shard, write_tokenizer
from workload import FAMILIES, SEED, SIZES, Timing, Workload, fastest

from encoder_train.devices import pick_device

# (warm-up steps, timed steps) by default; --warmup / --steps override them all.
DEFAULT_STEPS = {("small", 128): (5, 30), ("base", 128): (3, 5), ("base", 512): (2, 3)}


# ---- one workload: both sides ---------------------------------------------------------------------


@dataclass
class Row:
    workload: Workload
    ours: Timing
    hf: Timing
    flops: float  # useful FLOPs of the timed window
    hf_padding: float  # share of the HF batches' positions that are padding, in the window


def bench(
    work: Path, w: Workload, device: torch.device, rates: MatmulRates, repeats: int, hf_workers: int, verbose: bool
) -> Row:
    """Both sides on the same rows, `repeats` times each, alternating; each step's fastest run counts."""
    with progress(f"{w.name}: tokenizer and rows"):
        tokenizer = write_tokenizer(work / f"tokenizer_{w.size.vocab}.json", w.size.vocab)
        n_rows = w.total_steps * w.batch
        data_dir = write_shard(work / f"data_{w.name}", make_rows(n_rows, w.seq_len, w.size.vocab, seed=SEED))
        rows = rows_in_loader_order(data_dir, w.seq_len, n_rows)
    with progress(f"{w.name}: matmul rates"):
        rates.measure(w)

    ours_runs, hf_runs = [], []
    for r in range(repeats):
        # A side takes seconds (small) to minutes (base on a CPU): say what runs, so a quiet terminal is not a hang.
        with progress(f"{w.name}: encoder-train, run {r + 1} of {repeats}, {w.warmup} + {w.steps} steps"):
            ours_runs.append(run_encoder_train(work / f"ours_{w.name}_{r}", data_dir, tokenizer, w, verbose)[0])
        with progress(f"{w.name}: HF Trainer, run {r + 1} of {repeats}, {w.warmup} + {w.steps} steps"):
            hf_runs.append(run_hf(work / f"hf_{w.name}_{r}", rows, tokenizer, w, device, hf_workers, verbose)[0])
    print(
        f"  {w.name} s/step of each run: encoder-train "
        + " ".join(f"{t.seconds / w.steps:.3f}" for t in ours_runs)
        + ", HF "
        + " ".join(f"{t.seconds / w.steps:.3f}" for t in hf_runs),
        flush=True,
    )
    rates.measure(w)

    window = rows[w.warmup * w.batch : w.total_steps * w.batch]
    lengths = [len(r) for r in window]
    batches = [lengths[i : i + w.batch] for i in range(0, len(lengths), w.batch)]
    expected = [sum(b) for b in batches]
    for t in hf_runs:
        if hf_workers > 0:  # counted in worker processes: take the (identical) rows' counts
            t.step_tokens = expected
    if any(t.step_tokens != expected for t in ours_runs + hf_runs):
        raise RuntimeError("the two sides consumed different batches; the comparison would be void")
    padded = sum(len(b) * max(b) for b in batches)  # HF pads each batch to its longest row
    return Row(w, fastest(ours_runs), fastest(hf_runs), useful_flops(w.size, lengths), 1 - sum(lengths) / padded)


@contextmanager
def progress(what: str) -> Iterator[None]:
    """`  what ...` when it starts and `done in N s` when it ends, flushed at once (a log file sees it too)."""
    print(f"  {what} ...", end="", flush=True)
    start = time.perf_counter()
    yield
    print(f" done in {time.perf_counter() - start:.0f} s", flush=True)


def work_folder(path: Path) -> Path:
    """--work_dir, made if missing (parents too); a path that cannot be a folder is one sentence and exit 2."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"speed.py: --work_dir {path} cannot be a folder here ({e.strerror}); pass a folder you can "
              "write to (it is made if missing).", file=sys.stderr)
        raise SystemExit(2) from None
    return path


# ---- report ---------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    import transformers

    cpu, cores = cpu_name(), usable_cores()
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    return (
        f"machine: {cpu}, {cores} usable cores, torch threads {torch.get_num_threads()}{gpu}; device {device}; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"encoder-train {encoder_train_version()}"
    )


def encoder_train_version() -> str:
    """The checkout's commit (+ "dirty" with uncommitted changes), or the package version outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return importlib.metadata.version("encoder-train")
    return commit + (" dirty" if dirty else "")


def table(rows: list[Row], rates: MatmulRates) -> str:
    lines = [
        "| model | seq | precision | encoder-train tok/s | HF Trainer tok/s | ratio | encoder-train MFU | HF MFU |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w = r.workload
        mfu = [r.flops / t.seconds / 1e9 / rates.peak(w) for t in (r.ours, r.hf)]
        lines.append(
            f"| {w.size.label} | {w.seq_len} | {w.precision}{' compiled' if w.compile else ''} | "
            f"{r.ours.tokens_per_second:,.0f} | "
            f"{r.hf.tokens_per_second:,.0f} | {r.ours.tokens_per_second / r.hf.tokens_per_second:.2f}x | "
            f"{mfu[0]:.1%} | {mfu[1]:.1%} |"
        )
    return "\n".join(lines)


def details(rows: list[Row], rates: MatmulRates) -> str:
    lines = [
        "| model | seq | precision | batch | timed steps | real tok/step | HF padding | useful GFLOP/step | "
        "encoder-train s/step | HF s/step | matmul GFLOP/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w, n = r.workload, r.ours.steps
        lines.append(
            f"| {w.size.label} | {w.seq_len} | {w.precision} | {w.batch} | {n} | {r.ours.real_tokens / n:,.0f} | "
            f"{r.hf_padding:.1%} | {r.flops / n / 1e9:,.1f} | {r.ours.seconds / n:.3f} | {r.hf.seconds / n:.3f} | "
            f"{rates.peak(w):,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(FAMILIES), default="roberta",
                        help="both sides' model: roberta (RobertaForMaskedLM) or modernbert (ModernBertForMaskedLM)")
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES), help="none: --quality only")
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--seq_lens", nargs="+", type=int, help="row lengths for base (default: 128 512; modern: 512)")
    parser.add_argument("--steps", type=int, help="timed steps (default: small 30; base 5 at 128, 3 at 512)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: small 5; base 3 at 128, 2 at 512)")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per step (lower it where memory is short)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating; the fastest counts")
    parser.add_argument("--quality", action="store_true", help="also compare held-out MLM loss (small model)")
    parser.add_argument("--quality_steps", type=int, default=300, help="training steps of the quality check")
    parser.add_argument("--quality_seeds", type=int, default=1, help="seeds of the quality check (noise: 3 or more)")
    parser.add_argument("--compare_families", action="store_true",
                        help="held-out loss of RoBERTa small and a ModernBERT-style model of its parameter count "
                             "(encoder-train only; --quality_steps, --quality_seeds)")
    parser.add_argument("--hf_workers", type=int, default=0, help="HF dataloader_num_workers (its default: 0)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides (warm-up steps compile)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, 1 + 2 steps, 20 quality steps")
    parser.add_argument("--work_dir", type=Path, help="where data and checkpoints go (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="show both trainers' own output")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.warmup, args.steps, args.quality_steps = ["small"], 1, 2, 20
    if min(args.warmup or 1, args.steps or 1, args.repeats, args.batch_size) < 1 or args.quality_steps < 2:
        parser.error("--warmup, --steps, --repeats and --batch_size must be at least 1, --quality_steps at least 2")

    if args.work_dir is not None:  # made, or refused, before any minute is spent
        args.work_dir = work_folder(args.work_dir)
    import transformers

    transformers.logging.set_verbosity_error()
    device = pick_device()
    threads = torch.get_num_threads()
    print(machine(device), flush=True)
    rates = MatmulRates(device)
    sizes = FAMILIES[args.family]
    results: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for size in (sizes[s] for s in args.sizes):
            seq_lens = args.seq_lens if (args.seq_lens and size.name == "base") else size.seq_lens
            for seq_len in seq_lens:
                for precision in args.precisions:
                    warmup, steps = DEFAULT_STEPS.get((size.name, seq_len), (2, 3))
                    w = Workload(size, seq_len, precision, args.warmup or warmup, args.steps or steps, args.batch_size,
                                 compile=args.compile)
                    start = time.perf_counter()
                    results.append(bench(work, w, device, rates, args.repeats, args.hf_workers, args.verbose))
                    print(
                        f"  {w.name}: {w.warmup} + {w.steps} steps each side, x{args.repeats}, "
                        f"{time.perf_counter() - start:.0f} s",
                        flush=True,
                    )
                    if torch.get_num_threads() != threads:
                        print(f"  warning: torch threads changed from {threads} to {torch.get_num_threads()}")
        if results:
            print()
            print(machine(device))
            print(
                "rows of uniform length in [0.4 L, L]; ratio = encoder-train / HF tokens/s; "
                "MFU = useful FLOP/s / matmul GFLOP/s measured here (see the docstring)"
            )
            print()
            print(table(results, rates))
            print()
            print(details(results, rates))
            print()
            print(
                "matmul rates measured: "
                + ", ".join(
                    f"{p} {m}x{k}@{k}x{n}: {g:,.0f} GFLOP/s" for (p, m, k, n), g in sorted(rates.measured.items())
                ),
                flush=True,
            )
        if args.quality:
            print(f"\nquality: {args.quality_steps} steps of each side per seed, {args.quality_seeds} seed(s) ...",
                  flush=True)
            print(quality(work, args.quality_steps, args.precisions[0], device, args.hf_workers, args.verbose,
                          args.quality_seeds, sizes["small"]))
        if args.compare_families:
            print(f"\nfamilies: {args.quality_steps} steps per model and seed, {args.quality_seeds} seed(s) ...",
                  flush=True)
            print(family_comparison(work, args.quality_steps, args.precisions[0], device, args.verbose,
                                    args.quality_seeds))


if __name__ == "__main__":
    main()

"""Is the data loader ever the bottleneck? Step time fed by the real loader vs. by batches already in memory.

The same optimizer steps on the same batches, twice: once pulling each batch from `BatchStream`
(background workers reading memory-mapped shards, masking, collating, prefetching), once from a list
built beforehand. If the loader keeps ahead of the model, the two times match.

    python benchmarks/loader_overhead.py                    # the demo-sized model, rows of 128, 30% padding
    python benchmarks/loader_overhead.py --precision fp32 --steps 60 --workers 1

The loader runs as training runs it: `data.num_workers` unset (inline on a CPU, 2 workers on a GPU)
unless --workers says otherwise.

Prints a table: seconds per step with each source, and the loader's overhead in percent.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from host import cpu_name
from synthetic import mask_spec
from workload import SIZES, sync

from encoder_train.config import TrainingConfig
from encoder_train.data.loader import BatchStream
from encoder_train.data.mixture import MLMBatches
from encoder_train.data.shards import scan_shards
from encoder_train.devices import loader_workers
from encoder_train.model import MaskedLM
from encoder_train.optimizers import build_optimizer


def make_shards(folder: Path, vocab: int, rows: int, width: int, files: int = 4) -> None:
    """Rows of 40% to 100% of `width` real tokens (about 30% padding), Zipf-distributed ids."""
    g = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, vocab - 4, dtype=torch.float64)
    for f in range(files):
        t = torch.full((rows, width), 1, dtype=torch.int32)
        lengths = torch.randint(int(0.4 * width), width + 1, (rows,), generator=g)
        for i, n in enumerate(lengths.tolist()):
            t[i, :n] = (torch.multinomial(zipf, n, replacement=True, generator=g) + 5).to(torch.int32)
            t[i, 0], t[i, n - 1] = 0, 2
        torch.save(t, folder / f"shard_{f}.pt")


def seconds_per_step(source, dims, device: torch.device, warmup: int, steps: int,
                     autocast=None, after_step=None) -> float:
    """Seconds per optimizer step of a fresh model fed by `source` (an iterator of batches), timed after `warmup`
    steps; `after_step(i)`: what the training process adds to each step besides the model (the data position)."""
    autocast = autocast or contextlib.nullcontext()
    torch.manual_seed(0)
    model = MaskedLM(dims).to(device).train()
    opt = build_optimizer(model, TrainingConfig(), device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        b = next(source).to(device)
        with autocast:
            out = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(i)
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--workers", type=int, help="loader workers (default: as training picks, see loader_workers)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each source; the fastest counts")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.workers = loader_workers(args.workers, device)
    vocab = SIZES["small"].vocab
    dims = SIZES["small"].model_dims(args.seq_len)
    spec = mask_spec(vocab)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    n = args.warmup + args.steps

    with tempfile.TemporaryDirectory() as tmp:
        make_shards(Path(tmp), vocab, rows=max(256, n * args.batch_size // 4 + 1), width=args.seq_len)
        shards = scan_shards(tmp, dims.max_tokens)

        def stream() -> BatchStream:
            ds = MLMBatches(shards, spec, batch_size=args.batch_size, seed=0, shuffle_files=4)
            return BatchStream(ds, num_workers=args.workers, prefetch=4, pin_memory=device.type == "cuda")

        s = stream()
        in_memory = [next(s) for _ in range(n)]
        s.close()

        def run(source) -> float:
            return seconds_per_step(source, dims, device, args.warmup, args.steps, autocast)

        # Alternating, fastest of --repeats each: on a shared machine, the run least slowed by other work.
        memory_runs, loader_runs = [], []
        for _ in range(args.repeats):
            memory_runs.append(run(iter(in_memory)))
            live = stream()
            loader_runs.append(run(live))
            live.close()
        memory_s, loader_s = min(memory_runs), min(loader_runs)

    cpu = cpu_name()
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, device {device}, torch {torch.__version__}")
    print(f"model 4 x 256, vocab {vocab}, batch {args.batch_size} x {args.seq_len}, {args.precision}, "
          f"{args.workers} loader worker(s), {args.steps} timed steps, fastest of {args.repeats} alternating runs\n")
    print("| source | s/step |\n|---|---|")
    print(f"| batches in memory | {memory_s:.4f} |")
    source = "inline, in the training process" if args.workers == 0 else f"{args.workers} workers, prefetch"
    print(f"| real loader ({source}) | {loader_s:.4f} |")
    print(f"\nloader overhead: {100 * (loader_s / memory_s - 1):+.1f}%")


if __name__ == "__main__":
    main()

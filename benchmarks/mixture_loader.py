"""Does drawing rows from several sources slow training? One source against four, the same rows.

The same optimizer steps on two feeds: the loader reading one source (four shard files), and the loader reading the
same four files as four sources of equal weight (each micro-batch's rows drawn per row, data/mixture.py); each also
from its own batches held in memory, the reference its loader's share of step time is measured against. The
loader's runs include what training adds in the main process: the recount of each step's draws that advances
the data position (stream.py's step_done). Then the time to the first batch after resuming far into a run
(O(1): nothing is replayed).

    python benchmarks/mixture_loader.py                  # the demo-sized model, rows of 128, 30% padding
    python benchmarks/mixture_loader.py --steps 60 --workers 1

Prints a table: seconds per step for each feed, the loader's share of step time, and the resume latency.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from host import cpu_name
from loader_overhead import make_shards, seconds_per_step
from synthetic import mask_spec
from workload import SIZES

from encoder_train.data.loader import BatchStream
from encoder_train.data.mixture import SINGLE, MixedBatches, Source, draw_counts
from encoder_train.data.shards import scan_shards
from encoder_train.devices import loader_workers


class EqualMix:
    """Micro-batch g: `rows` rows drawn from the sources with equal weights (as phases.Plan.batch draws them)."""

    def __init__(self, sources: int, rows: int, mask_rate: float, seed: int = 0):
        self.weights, self.rows, self.mask_rate, self.seed = [1 / sources] * sources, rows, mask_rate, seed

    def batch(self, g: int) -> tuple[list[int], float]:
        return draw_counts(self.weights, self.rows, self.seed, g), self.mask_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--workers", type=int, help="loader workers (default: as training picks, see loader_workers)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each feed; the fastest counts")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.workers = loader_workers(args.workers, device)
    vocab = SIZES["small"].vocab
    dims = SIZES["small"].model_dims(args.seq_len)
    spec = mask_spec(vocab)
    n = args.warmup + args.steps

    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / f"part{i}" for i in range(4)]
        for i, f in enumerate(folders):
            f.mkdir()
            make_shards(f, vocab, rows=max(256, n * args.batch_size // 4 + 1), width=args.seq_len, files=1)
            (f / "shard_0.pt").rename(f / f"shard_{i}.pt")
        one = [Source(SINGLE, [s for f in folders for s in scan_shards(f, dims.max_tokens)])]
        four = [Source(f"part{i}", scan_shards(f, dims.max_tokens)) for i, f in enumerate(folders)]

        def stream(sources: list[Source]) -> BatchStream:
            ds = MixedBatches(sources, spec, EqualMix(len(sources), args.batch_size, spec.probability), seed=0,
                              shuffle_files=4, start={s.name: 0 for s in sources})
            return BatchStream(ds, num_workers=args.workers, prefetch=4, pin_memory=device.type == "cuda")

        in_memory = {}
        for name, sources in (("one", one), ("four", four)):  # each feed's own batches, held in memory
            s = stream(sources)
            in_memory[name] = [next(s) for _ in range(n)]
            s.close()

        def run(source, mix: EqualMix | None) -> float:  # with a mix: the main process's recount of each draw
            return seconds_per_step(source, dims, device, args.warmup, args.steps,
                                    after_step=mix.batch if mix is not None else None)

        times: dict[str, list[float]] = {"one memory": [], "one": [], "four memory": [], "four": []}
        for _ in range(args.repeats):  # alternating: on a shared machine, the run least slowed by other work counts
            for name, sources in (("one", one), ("four", four)):
                times[f"{name} memory"].append(run(iter(in_memory[name]), None))
                live = stream(sources)
                times[name].append(run(live, EqualMix(len(sources), args.batch_size, spec.probability)))
                live.close()
        best = {k: min(v) for k, v in times.items()}

        resume = {}
        for name, sources in (("one", one), ("four", four)):
            g = 10_000_000  # micro-batches into the run; each source far into its epochs
            ds = MixedBatches(sources, spec, EqualMix(len(sources), args.batch_size, spec.probability), seed=0,
                              shuffle_files=4, start={s.name: 80_000_000 * (1 + i) for i, s in enumerate(sources)},
                              first=g)
            t0 = time.perf_counter()
            live = BatchStream(ds, num_workers=args.workers, prefetch=4, pin_memory=False)
            next(live)
            resume[name] = time.perf_counter() - t0
            live.close()

    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, device {device}, torch {torch.__version__}")
    print(f"model 4 x 256, vocab {vocab}, batch {args.batch_size} x {args.seq_len}, fp32, {args.workers} loader "
          f"worker(s), {args.steps} timed steps, fastest of {args.repeats} alternating runs\n")
    print("| feed | s/step, batches in memory | s/step, loader | loader's share of step time | first batch after "
          "resuming at micro-batch 10,000,000 |")
    print("|---|---|---|---|---|")
    for name, label in (("one", "one source, 4 files"), ("four", "four sources, 1 file each, equal weights")):
        share = 100 * (1 - best[f"{name} memory"] / best[name])
        print(f"| {label} | {best[f'{name} memory']:.4f} | {best[name]:.4f} | {share:+.1f}% | "
              f"{resume[name] * 1000:.0f} ms |")
    print(f"\nfour sources / one source, with the loader: {best['four'] / best['one']:.3f}x step time")

if __name__ == "__main__":
    main()

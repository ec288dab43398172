"""How fast `pretokenize` turns text into packed shards, beside the tokenizer's own limit and beside what users do
today with `datasets`, on the same file.

    python benchmarks/pretokenize_throughput.py                      # stdlib corpus x 10 as .jsonl, ~20 MB
    python benchmarks/pretokenize_throughput.py --input a.jsonl b.jsonl.zst --tokenizer tokenizer.json
    python benchmarks/pretokenize_throughput.py --no_datasets        # without the `datasets` reference

Without --input it writes the quickstart corpus (CPython's documentation) `--repeat` times as .jsonl files (one
document per line, so that every side reads the same documents; one file per copy, so that tasks split them);
without --tokenizer it trains one (`--vocab_size`) on that input first. Each side gets the same files and the same
cores:

- ours: `pretokenize` (the function `encoder-train pretokenize` runs): read, tokenize, pack, write the shards.
- ceiling: `tokenizers`' `encode_batch` alone, on the same documents already in memory, in the same batches of
  ENCODE_BATCH_CHARS characters, on every core (RAYON_NUM_THREADS): no reading, packing or writing. Nothing
  that tokenizes with this tokenizer goes faster.
- datasets: `load_dataset("json")`, then `map(batched=True, num_proc=N)` with the transformers tokenizer made from
  the same tokenizer.json, then run_mlm.py's `group_texts` (concatenate, cut into blocks of seq_len), as
  transformers' examples/pytorch/language-modeling/run_mlm.py does it; its cache in a fresh folder.
- tasks: the whole command (`encoder-train pretokenize --num_tasks N --task_index i`) as one task, and as two tasks
  on two processes at once, each on half the cores: whether tasks scale.

Each side runs `--trials` times (2), taking turns, and its best time counts. Bytes/s are of the input files as
stored; tokens/s count each side's document tokens. Timings vary with the machine and with what else runs on it;
the table prints the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import tokenizers
import torch
from host import cpu_name, usable_cores

from encoder_train.data.prepare import ENCODE_BATCH_CHARS, pretokenize
from encoder_train.quickstart.corpus import write_stdlib_corpus
from encoder_train.textfiles import iter_texts
from encoder_train.tokenizer import load_tokenizer, train_tokenizer

OURS = "pretokenize (read, encode, pack, write)"
CEILING = "ceiling: encode_batch alone, in memory"


def main() -> None:
    """Parse arguments, prepare input and tokenizer, time each side, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, nargs="+", help="text/.jsonl(.gz/.zst) files (default: stdlib corpus)")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the stdlib corpus in the input")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: train one on the input)")
    parser.add_argument("--vocab_size", type=int, default=8192, help="when training the tokenizer")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--rows_per_shard", type=int, default=8192)
    parser.add_argument("--num_proc", type=int, default=2, help="datasets' map processes (default 2)")
    parser.add_argument("--no_datasets", action="store_true", help="skip the datasets reference")
    parser.add_argument("--no_tasks", action="store_true", help="skip one task against two on two processes")
    parser.add_argument("--trials", type=int, default=2, help="runs of each side, taking turns; the best counts")
    parser.add_argument("--work_dir", type=Path, help="where input, tokenizer and shards go (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = args.input or _repeated_stdlib_corpus(work / "corpus", args.repeat)
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            tokenizer_path = work / "tokenizer.json"
            train_tokenizer(inputs, tokenizer_path, args.vocab_size, overwrite=True)
        input_mb = sum(p.stat().st_size for p in inputs) / 1e6

        # The sides take turns, each `--trials` times, and each keeps its best time: a machine shared with other
        # work slows whichever side runs at the time, and the turns spread that over all of them.
        best: dict[str, Timed] = {}
        for trial in range(args.trials):
            clock = Clock()
            report = pretokenize(inputs, tokenizer_path, work / "shards", args.seq_len,
                                 rows_per_shard=args.rows_per_shard, overwrite=True, progress=False)
            timed = {OURS: clock.stop(report.tokens), CEILING: _ceiling(inputs, tokenizer_path)}
            if not args.no_datasets:
                timed[f"datasets map(num_proc={args.num_proc}) + group_texts"] = _datasets_map(
                    inputs, tokenizer_path, args.seq_len, args.num_proc, work / f"hf-{trial}")
            for name, t in timed.items():
                if name not in best or t.seconds < best[name].seconds:
                    best[name] = t
        scaling = None if args.no_tasks else _tasks(inputs, tokenizer_path, args, work / "tasks")

    ceiling = best[CEILING]
    print()
    print(f"{'':44} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'of ceiling':>10} {'CPU s':>7} {'of ceiling':>10}")
    for name, t in best.items():
        print(f"{name:44} {t.seconds:8.2f} {input_mb / t.seconds:7.2f} {t.tokens / t.seconds / 1e6:7.2f} "
              f"{ceiling.seconds / t.seconds:10.0%} {t.cpu_seconds:7.2f} {ceiling.cpu_seconds / t.cpu_seconds:10.0%}")
    if not args.no_datasets:
        others = [t for name, t in best.items() if name not in (OURS, CEILING)]
        print(f"pretokenize / datasets: {others[0].seconds / best[OURS].seconds:.2f}x as fast")
    print("of ceiling: the ceiling's seconds (CPU seconds) / the side's; CPU seconds count every thread and child "
          "process, the measure that another program on the same cores disturbs least")
    print(f"input {input_mb:.1f} MB ({', '.join(p.name for p in inputs[:3])}{', ...' if len(inputs) > 3 else ''}), "
          f"seq_len {report.seq_len}, {report.documents} documents, {report.tokens} tokens, "
          f"{report.rows} rows in {report.shards} shards (fill {report.fill_ratio:.4f})")
    if scaling is not None:
        print(scaling)
    print(_machine())


@dataclass(frozen=True)
class Timed:
    seconds: float  # wall clock
    cpu_seconds: float  # user + system, every thread and every finished child process
    tokens: int


class Clock:
    """Wall and CPU time from its creation to `stop`."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _cpu()

    def stop(self, tokens: int) -> Timed:
        return Timed(time.perf_counter() - self.wall, _cpu() - self.cpu, tokens)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _repeated_stdlib_corpus(folder: Path, repeat: int) -> list[Path]:
    """The quickstart corpus, `repeat` times over, as `repeat` .jsonl files (one {"text": document} per line), so
    that tasks can split them."""
    folder.mkdir(parents=True, exist_ok=True)
    single = write_stdlib_corpus(folder / "stdlib_once.txt")
    text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in iter_texts([single.path]))
    paths = [folder / f"part-{i:03d}.jsonl" for i in range(repeat)]
    for p in paths:
        p.write_text(text, encoding="utf-8")
    return paths


def _tasks(inputs: list[Path], tokenizer_path: Path, args: argparse.Namespace, work: Path) -> str:
    """The whole `encoder-train pretokenize` command as one task, then as two tasks on two processes at once
    (`--num_tasks 2 --task_index i`, inputs split by file), each task on half the cores (RAYON_NUM_THREADS), so that
    two tasks have the cores one task would leave idle. A line for the table."""
    help_text = subprocess.run([sys.executable, "-m", "encoder_train", "pretokenize", "--help"], capture_output=True,
                               text=True).stdout
    if "--num_tasks" not in help_text:
        return "tasks: skipped (this pretokenize has no --num_tasks)"
    threads = max(1, usable_cores() // 2)
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}

    def run(num_tasks: int, out: Path) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "encoder_train", "pretokenize", "--input", *map(str, inputs),
                                   "--tokenizer_filepath", str(tokenizer_path), "--output_dir", str(out),
                                   "--seq_len", str(args.seq_len), "--rows_per_shard", str(args.rows_per_shard),
                                   "--num_tasks", str(num_tasks), "--task_index", str(i)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(num_tasks)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"pretokenize --num_tasks {num_tasks} failed: {err[-2000:]}")
        return time.perf_counter() - start

    one = min(run(1, work / f"one-{t}") for t in range(args.trials))
    two = min(run(2, work / f"two-{t}") for t in range(args.trials))
    return (f"tasks ({threads} thread(s) each, whole commands with their start-up): one task {one:.2f} s, two tasks "
            f"on two processes {two:.2f} s: {one / two:.2f}x as fast (2x would be perfect)")


def _ceiling(inputs: list[Path], tokenizer_path: Path) -> Timed:
    """The time and tokens of encode_batch on the documents, read beforehand, in pretokenize's batches."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.encode_special_tokens = True  # as pretokenize encodes
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    batches, batch, chars = [], [], 0
    for text in iter_texts(inputs):
        batch.append(text)
        chars += len(text)
        if chars >= ENCODE_BATCH_CHARS:
            batches.append(batch)
            batch, chars = [], 0
    batches.append(batch)
    tokens = 0
    clock = Clock()
    for batch in batches:
        tokens += sum(len(e.ids) for e in encode_batch(batch, add_special_tokens=False))
    return clock.stop(tokens)


def _datasets_map(inputs: list[Path], tokenizer_path: Path, seq_len: int, num_proc: int,
                  cache: Path) -> Timed:
    """The time and document tokens of run_mlm.py's way: load the .jsonl, tokenize with map, group into blocks."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    if any(not p.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")) for p in inputs):
        raise SystemExit("the datasets reference reads .jsonl inputs only; pass --no_datasets for other files")

    def tokenize(examples: dict) -> dict:
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:  # run_mlm.py's, word for word in what it computes
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated[next(iter(examples))]) // seq_len) * seq_len
        return {k: [t[i : i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}

    clock = Clock()
    raw = datasets.load_dataset("json", data_files=[str(p) for p in inputs], split="train", cache_dir=str(cache))
    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=raw.column_names)
    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    done = clock.stop(0)
    # Document tokens: each row of input_ids holds <s> ... </s> around the document.
    tokens = sum(len(ids) - 2 for ids in tokenized["input_ids"])
    assert len(grouped) > 0
    return Timed(done.seconds, done.cpu_seconds, tokens)


def _machine() -> str:
    """CPU model, usable cores, library versions."""
    try:
        import datasets

        hf = f", datasets {datasets.__version__}"
    except ImportError:
        hf = ""
    return (
        f"machine: {cpu_name()}, {usable_cores()} usable cores "
        f"(RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}); "
        f"python {platform.python_version()}, torch {torch.__version__}, tokenizers {tokenizers.__version__}{hf}"
    )


if __name__ == "__main__":
    main()

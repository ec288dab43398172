"""How fast `pretokenize` turns text into packed shards, beside a one-thread reference.

    python benchmarks/pretokenize_throughput.py                      # stdlib corpus x 10, ~19 MB
    python benchmarks/pretokenize_throughput.py --input a.txt b.jsonl.gz --tokenizer tokenizer.json

Without --input it writes the quickstart corpus (CPython's documentation) `--repeat` times into one
file; without --tokenizer it trains one (`--vocab_size`) on that input first. The reference encodes
each document with `Tokenizer.encode` on one thread and does nothing else (no packing, no writing):
what a plain Python loop would do. Timings vary with the machine; the table prints which one.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import tokenizers
import torch
from host import cpu_name, usable_cores

from encoder_train.data.prepare import pretokenize
from encoder_train.quickstart.corpus import write_stdlib_corpus
from encoder_train.textfiles import iter_texts
from encoder_train.tokenizer import load_tokenizer, train_tokenizer


def main() -> None:
    """Parse arguments, prepare input and tokenizer, time both, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, nargs="+", help="text/.jsonl(.gz) files (default: stdlib corpus)")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the stdlib corpus in the input")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: train one on the input)")
    parser.add_argument("--vocab_size", type=int, default=8192, help="when training the tokenizer")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--rows_per_shard", type=int, default=8192)
    parser.add_argument("--work_dir", type=Path, help="where input, tokenizer and shards go (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = args.input or [_repeated_stdlib_corpus(work / "corpus.txt", args.repeat)]
        tokenizer_path, train_seconds = args.tokenizer, None
        if tokenizer_path is None:
            tokenizer_path = work / "tokenizer.json"
            start = time.perf_counter()
            train_tokenizer(inputs, tokenizer_path, args.vocab_size, overwrite=True)
            train_seconds = time.perf_counter() - start

        report = pretokenize(
            inputs, tokenizer_path, work / "shards", args.seq_len, rows_per_shard=args.rows_per_shard,
            overwrite=True, progress=False,
        )  # fmt: skip
        reference_seconds = _one_thread_reference(inputs, tokenizer_path)

    mb = report.input_bytes / 1e6
    print()
    print(f"{'':38} {'input MB':>9} {'seconds':>8} {'MB/s':>7} {'rows':>8} {'fill':>6} {'Mtok/s':>7}")
    print(
        f"{'pretokenize (encode_batch, packed)':38} {mb:9.1f} {report.seconds:8.2f} "
        f"{report.megabytes_per_second:7.2f} {report.rows:8d} {report.fill_ratio:6.4f} "
        f"{report.tokens / report.seconds / 1e6:7.2f}"
    )
    print(
        f"{'reference (encode, 1 thread, no I/O)':38} {mb:9.1f} {reference_seconds:8.2f} "
        f"{mb / reference_seconds:7.2f} {'-':>8} {'-':>6} {report.tokens / reference_seconds / 1e6:7.2f}"
    )
    print(f"speed-up over the reference: {reference_seconds / report.seconds:.2f}x")
    if train_seconds is not None:
        print(f"tokenizer training (vocab {args.vocab_size}): {train_seconds:.2f} s")
    print(
        f"seq_len {report.seq_len}, {report.documents} documents, {report.tokens} tokens, "
        f"{report.train_rows} train + {report.val_rows} val rows in {report.shards} shards"
    )
    print(_machine())


def _repeated_stdlib_corpus(path: Path, repeat: int) -> Path:
    """The quickstart corpus, `repeat` times over, in one file (documents stay blank-line separated)."""
    single = write_stdlib_corpus(path.with_name("stdlib_once.txt"))
    text = single.path.read_text(encoding="utf-8")
    path.write_text("\n".join([text] * repeat), encoding="utf-8")
    return path


def _one_thread_reference(inputs: list[Path], tokenizer_path: Path) -> float:
    """Seconds to encode every document with `Tokenizer.encode`, one call per document."""
    tokenizer = load_tokenizer(tokenizer_path)
    documents = list(iter_texts(inputs))  # read beforehand: the reference times tokenization only
    start = time.perf_counter()
    for text in documents:
        tokenizer.encode(text, add_special_tokens=False)
    return time.perf_counter() - start


def _machine() -> str:
    """CPU model, usable cores, library versions."""
    return (
        f"machine: {cpu_name()}, {usable_cores()} usable cores "
        f"(RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}); "
        f"python {platform.python_version()}, torch {torch.__version__}, tokenizers {tokenizers.__version__}"
    )


if __name__ == "__main__":
    main()

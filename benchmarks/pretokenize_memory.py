"""Peak memory of `pretokenize` on one 20 MB line against the same words in ordinary lines.

    python benchmarks/pretokenize_memory.py [--tokenizer runs/demo/tokenizer.json] [--megabytes 20]

Without --tokenizer, a byte-level BPE tokenizer is trained on the generated text first. Each measurement is a
fresh process (its peak RSS, from getrusage). Prints a table with the machine.
"""

from __future__ import annotations

import argparse
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

PEAK = """
import resource, sys
from encoder_train.data.prepare import pretokenize
pretokenize([sys.argv[1]], sys.argv[2], sys.argv[3], seq_len=128, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def text(megabytes: int, newline_every: int | None, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    out, size, i = [], 0, 0
    while size < megabytes * 1_000_000:
        word = rng.choice(vocab)
        out.append(word)
        size, i = size + len(word) + 1, i + 1
        if newline_every and i % newline_every == 0:
            out.append("\n")
    return " ".join(out).replace(" \n ", "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--megabytes", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        inputs = {f"one line of {args.megabytes} MB": text(args.megabytes, None),
                  "the same words in lines of 15 words": text(args.megabytes, 15)}
        tokenizer = args.tokenizer
        if tokenizer is None:
            from encoder_train.tokenizer import train_tokenizer

            (work / "sample.txt").write_text(text(2, 15, seed=1))
            tokenizer = work / "tokenizer.json"
            train_tokenizer([work / "sample.txt"], tokenizer, vocab_size=8192)
        for i, (name, body) in enumerate(inputs.items()):
            path = work / f"input_{i}.txt"
            path.write_text(body)
            out = subprocess.run([sys.executable, "-c", PEAK, str(path), str(tokenizer), str(work / f"out_{i}")],
                                 capture_output=True, text=True, check=True).stdout
            rows.append((name, int(out.split()[-1]) / 1024))
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print("| input | peak RSS (MB) |\n|---|---:|")
    for name, mb in rows:
        print(f"| {name} | {mb:,.0f} |")


if __name__ == "__main__":
    main()

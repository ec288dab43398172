"""A document of any length: cut into pieces at word boundaries before the tokenizer sees it, with the tokens
of the whole text, and the memory of a file of ordinary lines."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from encoder_train.textfiles import pieces
from encoder_train.tokenizer import train_tokenizer


def words(n: int, seed: int = 0, newline_every: int | None = None) -> str:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(300)] + [",", "."]
    out = []
    for i in range(n):
        out.append(rng.choice(vocab))
        if newline_every and i % newline_every == newline_every - 1:
            out.append("\n")
    return " ".join(out).replace(" \n ", "\n")


def test_pieces_keep_the_tokens_of_the_whole_text(tmp_path):
    text = words(4000) + "  double  spaces   and\ttabs " + words(3000, seed=1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(words(20000, seed=2, newline_every=12))
    tok = train_tokenizer([corpus], tmp_path / "tok.json", vocab_size=400)
    cut = list(pieces(text, limit=500))
    assert len(cut) > 40 and "".join(cut) == text and all(len(p) <= 500 for p in cut)
    whole = tok.encode(text, add_special_tokens=False).ids
    assert [i for p in cut for i in tok.encode(p, add_special_tokens=False).ids] == whole
    assert list(pieces("short")) == ["short"]
    assert list(pieces("x" * 1200, limit=500)) == ["x" * 500, "x" * 500, "x" * 200]  # no space: cut at the limit


PEAK = """
import resource, sys
from encoder_train.data.prepare import pretokenize
pretokenize([sys.argv[1]], sys.argv[2], sys.argv[3], seq_len=64, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_one_line_of_megabytes_takes_the_memory_of_ordinary_lines(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(words(20000, seed=2, newline_every=12))
    train_tokenizer([corpus], tmp_path / "tok.json", vocab_size=400)
    one_line, lines = tmp_path / "one_line.txt", tmp_path / "lines.txt"
    one_line.write_text(words(1_200_000, seed=3))  # ~7 MB, no line break
    lines.write_text(words(1_200_000, seed=3, newline_every=15))  # the same words, lines of 15

    def peak_kb(path, out) -> int:
        proc = subprocess.run([sys.executable, "-c", PEAK, str(path), str(tmp_path / "tok.json"), str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    # Whole, the line took ~150 bytes a character in the tokenizer (~1 GB here against ~0.4 GB for the lines).
    assert peak_kb(one_line, tmp_path / "a") < 1.5 * peak_kb(lines, tmp_path / "b")

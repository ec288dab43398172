"""Tokenizer training on a bounded, reproducible sample (textsample.py, `tokenizer --max_bytes/--sample_rate`): the
same arguments give the same tokenizer.json, the sample stays within its bytes and is spread over the inputs, and a
file is read no further than its share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encoder_train.cli import main
from encoder_train.errors import UserError
from encoder_train.textsample import SampleReport, Sampling, sample_texts


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def corpus(tmp_path: Path, files: int = 4, docs: int = 300) -> list[Path]:
    """Files whose documents name their file (`f2 d17 ...`), with mixed-script words so byte counts differ from
    character counts."""
    words = "the model reads café über 日本語 token".split()
    return [jsonl(tmp_path / f"part-{f}.jsonl",
                  [f"f{f} d{d} " + " ".join(words[(d * k) % len(words)] for k in range(1, 2 + d % 9))
                   for d in range(docs)])
            for f in range(files)]


def sample(paths: list[Path], sampling: Sampling) -> tuple[list[str], SampleReport]:
    report = SampleReport()
    return list(sample_texts(paths, sampling, report)), report


def test_max_bytes_takes_an_equal_share_from_the_start_of_each_input(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", ["0123456789"] * 10)
    b = jsonl(tmp_path / "b.jsonl", ["abcdefghij"] * 10)
    texts, report = sample([a, b], Sampling(max_bytes=50))
    assert texts == ["0123456789", "0123456789", "01234", "abcdefghij", "abcdefghij", "abcde"]
    assert (report.documents, report.text_bytes) == (6, 50)
    # A short input passes the rest of its share on to the inputs after it.
    short = jsonl(tmp_path / "short.jsonl", ["xy"])
    texts, report = sample([short, a], Sampling(max_bytes=40))
    assert texts == ["xy", "0123456789", "0123456789", "0123456789", "01234567"] and report.text_bytes == 40


def test_the_sample_is_bounded_and_spread_over_every_input(tmp_path):
    paths = corpus(tmp_path)
    whole = sum(len(t.encode()) for t in sample(paths, Sampling())[0])
    for max_bytes in (1000, 7777, whole // 3):
        texts, report = sample(paths, Sampling(max_bytes=max_bytes, rate=0.5, seed=3))
        size = sum(len(t.encode()) for t in texts)
        assert size == report.text_bytes <= max_bytes
        assert size > max_bytes * 0.99  # the budget is used: the files hold more than their shares
        assert all(any(t.startswith(f"f{f} d") for t in texts) for f in range(4))  # every file gave some


def test_a_rate_keeps_the_same_documents_whatever_the_order_of_the_files(tmp_path):
    paths = corpus(tmp_path)
    kept = sample(paths, Sampling(rate=0.25, seed=7))[0]
    assert 0.2 < len(kept) / 1200 < 0.3
    assert sorted(sample(paths[::-1], Sampling(rate=0.25, seed=7))[0]) == sorted(kept)
    assert sample(paths, Sampling(rate=0.25, seed=8))[0] != kept  # another seed, another sample
    assert set(sample(paths, Sampling(rate=0.5, seed=7))[0]) >= set(kept)  # a higher rate keeps a superset
    assert sample(paths, Sampling(rate=0.25, seed=-(10**30)))[0] != kept  # any integer is a seed


def test_a_file_is_read_no_further_than_its_share(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", ["fine text here"] * 50)
    # 1,000 good lines, then one that is not JSON: reading the whole file stops there with one sentence.
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(jsonl(tmp_path / "x.jsonl", ["early text"] * 1000).read_text() + "{not json\n")
    with pytest.raises(UserError, match="damaged.jsonl line 1001"):
        sample([good, damaged], Sampling())
    texts, report = sample([good, damaged], Sampling(max_bytes=2000))
    assert report.text_bytes == 2000 and texts[-1].startswith("early")


def test_an_empty_input_passes_its_share_on(tmp_path):
    empty = jsonl(tmp_path / "empty.jsonl", [])
    a = jsonl(tmp_path / "a.jsonl", ["0123456789"] * 10)
    texts, report = sample([empty, a], Sampling(max_bytes=30))
    assert report.text_bytes == 30
    with pytest.raises(UserError, match="holds no text"):
        sample([empty], Sampling(max_bytes=30))


def tokenizer(capsys, tmp_path: Path, name: str, paths: list[Path], *flags) -> tuple[int, str]:
    try:
        rc = main(["tokenizer", "--input", *map(str, paths), "--output", str(tmp_path / name), "--vocab_size", "300",
                   *map(str, flags)])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_the_same_arguments_give_the_same_tokenizer(capsys, tmp_path):
    paths = corpus(tmp_path, docs=400)
    flags = ("--max_bytes", 20000, "--sample_rate", 0.5, "--sample_seed", 1)
    rc, out = tokenizer(capsys, tmp_path, "one.json", paths, *flags)
    assert rc == 0, out
    assert "trained on a sample of" in out and "bytes of text" in out
    assert tokenizer(capsys, tmp_path, "two.json", paths, *flags)[0] == 0
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    assert tokenizer(capsys, tmp_path, "whole.json", paths)[0] == 0
    assert (tmp_path / "whole.json").read_bytes() != (tmp_path / "one.json").read_bytes()


@pytest.mark.parametrize("flags, says", [
    (("--sample_rate", 0), "--sample_rate 0.0 is not a probability in (0, 1]"),
    (("--sample_rate", 1.5), "--sample_rate 1.5 is not a probability"),
    (("--sample_rate", "nan"), "--sample_rate nan is not a probability"),
    (("--max_bytes", 0), "must be a positive integer"),
])
def test_bad_sampling_flags_are_one_sentence(capsys, tmp_path, flags, says):
    rc, out = tokenizer(capsys, tmp_path, "t.json", corpus(tmp_path, files=1, docs=5), *flags)
    assert rc == 2 and says in out and "Traceback" not in out
    assert not (tmp_path / "t.json").exists()

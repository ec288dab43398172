"""Pretokenizing text into packed train/val `.pt` shards."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from encoder_train.data.prepare import pretokenize
from encoder_train.errors import UserError
from encoder_train.textfiles import iter_texts
from encoder_train.tokenizer import train_tokenizer

BOS, PAD, EOS = 0, 1, 2
WORDS = "the a of model token naïve café 日本語 🙂 (x) 3.14 it's".split()
# Text that spells special tokens must stay text: only the packer places <s>, </s> and <pad>.
TRICKY = "an HTML <s>strike</s> tag, a <mask> and <pad> in prose"


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Short numbered documents (so that no two rows are alike), one of them with special-token text."""
    rng = random.Random(seed)
    docs = [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) for i in range(n)]
    docs[n // 2] = TRICKY
    return docs


def write_text(path: Path, docs: list[str]) -> Path:
    """Plain text, documents separated by blank lines."""
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    corpus = write_text(folder / "corpus.txt", make_documents(300, seed=1))
    path = folder / "tokenizer.json"
    train_tokenizer([corpus], path, vocab_size=400)
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_text(tmp_path / "corpus.txt", make_documents(600))


def shards(folder: Path) -> list[torch.Tensor]:
    """Every shard in a split folder, in name order, memory-mapped as the trainer loads them."""
    return [torch.load(p, weights_only=True, mmap=True) for p in sorted(folder.glob("*.pt"))]


def all_rows(folder: Path) -> torch.Tensor:
    return torch.cat(shards(folder))


def test_shards_have_the_documented_format(tmp_path, corpus, tokenizer_path):
    seq_len, per_shard = 32, 50
    report = pretokenize(
        [corpus], tokenizer_path, tmp_path / "out", seq_len, rows_per_shard=per_shard, val_fraction=0.1,
        progress=False,
    )  # fmt: skip
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    for split, expected_rows in (("train", report.train_rows), ("val", report.val_rows)):
        tensors = shards(tmp_path / "out" / split)
        assert [t.shape[0] for t in tensors[:-1]] == [per_shard] * (len(tensors) - 1)  # only the last is short
        assert sum(t.shape[0] for t in tensors) == expected_rows > 0
        for t in tensors:
            assert t.dtype == torch.int32 and t.dim() == 2 and t.shape[1] == seq_len
            assert 0 <= int(t.min()) and int(t.max()) < vocab
            assert (t[:, 0] == BOS).all()
    rows = torch.cat([all_rows(tmp_path / "out" / s) for s in ("train", "val")])
    padded = (rows == PAD).any(dim=1)
    assert int(padded.sum()) == 1  # padding only in the very last row
    assert (rows[~padded, -1] == EOS).all()
    (last,) = rows[padded]
    n_real = int((last != PAD).sum())
    assert last[n_real - 1] == EOS and (last[n_real:] == PAD).all()  # <s> ... </s> <pad> <pad> ...
    assert report.rows == len(rows) and report.shards == report.train_shards + report.val_shards
    assert report.output_bytes == sum(p.stat().st_size for p in (tmp_path / "out").rglob("*.pt"))


def test_packing_loses_nothing(tmp_path, corpus, tokenizer_path):
    report = pretokenize([corpus], tokenizer_path, tmp_path / "out", 24, val_fraction=0.0, progress=False)
    stream: list[int] = []
    for row in all_rows(tmp_path / "out" / "train").tolist():
        real = [i for i in row if i != PAD]
        assert real[0] == BOS and real[-1] == EOS
        stream += real[1:-1]  # the row's own <s> ... </s>; what is left is the document stream
    assert not {BOS, PAD, 3, 4} & set(stream)  # no <s> <pad> <unk> <mask>, even from TRICKY's text
    pieces: list[list[int]] = [[]]
    for i in stream:  # </s> separates documents inside the stream
        if i == EOS:
            pieces.append([])
        else:
            pieces[-1].append(i)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    documents = list(iter_texts([corpus]))
    assert TRICKY in documents
    assert [tokenizer.decode(p) for p in pieces] == documents
    assert report.documents == len(documents) and report.tokens == len(stream) - (len(documents) - 1)


def test_many_short_documents_fill_the_rows(tmp_path, corpus, tokenizer_path):
    report = pretokenize([corpus], tokenizer_path, tmp_path / "out", 64, progress=False)
    rows = all_rows(tmp_path / "out" / "train")
    assert report.fill_ratio > 0.95
    assert report.fill_ratio == pytest.approx(float((rows != PAD).float().mean()), abs=0.01)


def test_train_and_val_are_a_disjoint_split_of_the_rows(tmp_path, corpus, tokenizer_path):
    pretokenize([corpus], tokenizer_path, tmp_path / "all", 16, val_fraction=0.0, progress=False)
    report = pretokenize([corpus], tokenizer_path, tmp_path / "split", 16, val_fraction=0.1, progress=False)
    full = all_rows(tmp_path / "all" / "train")
    train, val = all_rows(tmp_path / "split" / "train"), all_rows(tmp_path / "split" / "val")
    assert len(train) + len(val) == len(full) == report.rows
    assert len(val) == report.val_rows == math.floor(len(full) * 0.1)
    is_val = torch.zeros(len(full), dtype=torch.bool)
    is_val[9::10] = True  # every 10th row
    assert torch.equal(val, full[is_val]) and torch.equal(train, full[~is_val])
    assert not {tuple(r) for r in train.tolist()} & {tuple(r) for r in val.tolist()}  # no row in both


def test_same_input_gives_identical_files(tmp_path, corpus, tokenizer_path):
    # batch_chars changes only how text is handed to the tokenizer, never the output.
    for name, batch_chars in (("a", 1 << 22), ("b", 1 << 22), ("c", 300)):
        pretokenize(
            [corpus], tokenizer_path, tmp_path / name, 32, rows_per_shard=40, val_fraction=0.05,
            batch_chars=batch_chars, progress=False,
        )  # fmt: skip
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.pt"))
    assert len(files) > 3
    for other in ("b", "c"):
        assert sorted(p.relative_to(tmp_path / other) for p in (tmp_path / other).rglob("*.pt")) == files
        for f in files:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / other / f).read_bytes(), f


def test_jsonl_gz_input_gives_the_same_shards_as_text(tmp_path, corpus, tokenizer_path):
    docs = list(iter_texts([corpus]))
    jsonl = tmp_path / "corpus.jsonl.gz"
    jsonl.write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    pretokenize([corpus], tokenizer_path, tmp_path / "txt", 32, progress=False)
    pretokenize([jsonl], tokenizer_path, tmp_path / "jsonl", 32, progress=False)
    for split in ("train", "val"):
        assert torch.equal(all_rows(tmp_path / "txt" / split), all_rows(tmp_path / "jsonl" / split))


def test_several_inputs_are_one_stream(tmp_path, corpus, tokenizer_path):
    docs = list(iter_texts([corpus]))
    first, second = write_text(tmp_path / "1.txt", docs[:250]), write_text(tmp_path / "2.txt", docs[250:])
    pretokenize([corpus], tokenizer_path, tmp_path / "one", 32, progress=False)
    report = pretokenize([first, second], tokenizer_path, tmp_path / "two", 32, progress=False)
    assert report.documents == len(docs)
    assert torch.equal(all_rows(tmp_path / "one" / "train"), all_rows(tmp_path / "two" / "train"))


def test_refuses_to_overwrite_shards_unless_asked(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "out"
    pretokenize([corpus], tokenizer_path, out, 16, rows_per_shard=10, progress=False)
    before = sorted(out.rglob("*.pt"))
    with pytest.raises(UserError, match=r"already holds \d+ .pt shards.*--overwrite"):
        pretokenize([corpus], tokenizer_path, out, 16, progress=False)
    assert sorted(out.rglob("*.pt")) == before
    (out / "train" / "notes.txt").write_text("keep me")
    report = pretokenize([corpus], tokenizer_path, out, 64, rows_per_shard=10_000, overwrite=True, progress=False)
    assert sorted(p.name for p in (out / "train").glob("*.pt")) == ["shard_00000.pt"]  # old shards gone
    assert (out / "train" / "notes.txt").read_text() == "keep me"  # anything else stays
    assert report.train_shards == 1


def test_a_failure_midway_leaves_no_shards(tmp_path, tokenizer_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in make_documents(400)] + ["not json"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="bad.jsonl line 401 is not valid JSON"):
        pretokenize([path], tokenizer_path, tmp_path / "out", 16, rows_per_shard=5, batch_chars=200, progress=False)
    assert not list((tmp_path / "out").rglob("*.pt*"))


# --- errors: one sentence naming the file or value ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 7}, "seq_len 7 is too short"),
        ({"seq_len": 600, "max_positions": 512}, "seq_len 600 is longer than the model's max_positions 512"),
        ({"rows_per_shard": 0}, "rows_per_shard 0 must be at least 1"),
        ({"val_fraction": 1.0}, r"val_fraction 1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(tmp_path, corpus, tokenizer_path, kwargs, message):
    args = {"seq_len": 32} | kwargs
    with pytest.raises(UserError, match=message):
        pretokenize([corpus], tokenizer_path, tmp_path / "out", progress=False, **args)


def test_missing_input(tmp_path, tokenizer_path):
    with pytest.raises(UserError, match="missing.txt does not exist"):
        pretokenize([tmp_path / "missing.txt"], tokenizer_path, tmp_path / "out", 32, progress=False)


def test_empty_input_keeps_old_shards(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "out"
    pretokenize([corpus], tokenizer_path, out, 32, progress=False)
    before = sorted(out.rglob("*.pt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty.txt holds no text"):
        pretokenize([empty], tokenizer_path, out, 32, overwrite=True, progress=False)
    assert sorted(out.rglob("*.pt")) == before


def test_tokenizer_without_special_tokens(tmp_path, corpus):
    path = tmp_path / "plain.json"
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    with pytest.raises(UserError, match="has no <s> token"):
        pretokenize([corpus], path, tmp_path / "out", 32, progress=False)


def test_missing_tokenizer(tmp_path, corpus):
    with pytest.raises(UserError, match="tokenizer file .*nope.json does not exist"):
        pretokenize([corpus], tmp_path / "nope.json", tmp_path / "out", 32, progress=False)


def test_output_dir_that_is_a_file(tmp_path, corpus, tokenizer_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match="output_dir .*out is a file"):
        pretokenize([corpus], tokenizer_path, tmp_path / "out", 32, progress=False)

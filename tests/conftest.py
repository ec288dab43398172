"""Shared fixtures: a small real tokenizer and generated shards, made on the spot (no downloads); a byte-level BPE
tokenizer, a tiny pretrained checkpoint and a real S3-compatible server for the modules that share them.

Plain helper functions that several test modules share live in helpers/."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from encoder_train.cli import main
from encoder_train.tokenizer import train_tokenizer, word_level_tokenizer

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BOS, PAD, EOS, UNK, MASK = range(5)
VOCAB = 128  # 5 specials + 123 words
TEXT = "the model reads a token and the café writes {i} words, then the model stops.\n\n"
PRETRAIN = """
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 64}
data: {num_workers: 0}
training: {batch_size: 16, max_steps: 8, learning_rate: 3.0e-3, warmup_steps: 2, precision: fp32, log_interval: 4}
checkpoint: {checkpoint_every: 8}
"""


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    # Tests use real W&B runs, offline: nothing leaves the machine.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def make_tokenizer(path: Path, vocab: int = VOCAB) -> Path:
    """A word-level tokenizer with RoBERTa's special tokens at ids 0..4 and words w5..w{vocab-1}."""
    word_level_tokenizer(vocab).save(str(path))
    return path


def make_rows(n: int, width: int, vocab: int = VOCAB, seed: int = 0, min_len: int | None = None) -> torch.Tensor:
    """Learnable rows: <s>, a 4-token motif repeated, </s>, right-padded. Motif words follow a Zipf law,
    so a model first learns the word frequencies (the loss drops within tens of steps), then to copy."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((n, width), PAD, dtype=torch.int64)
    words = vocab - len(SPECIALS)
    zipf = 1.0 / torch.arange(1, words + 1, dtype=torch.float64) ** 1.2
    for i in range(n):
        length = int(torch.randint(min_len or width // 2, width + 1, (1,), generator=g))
        motif = torch.multinomial(zipf, 4, replacement=True, generator=g) + len(SPECIALS)
        body = motif.repeat(width)[: length - 2]
        rows[i, 0], rows[i, 1 : length - 1], rows[i, length - 1] = BOS, body, EOS
    return rows


def make_shards(directory: Path, files: int = 3, rows: int = 64, width: int = 32, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        sub = directory / ("nested" if f % 2 else "") / f"shard_{f:03d}.pt"
        sub.parent.mkdir(parents=True, exist_ok=True)
        torch.save(make_rows(rows, width, seed=seed + f).to(torch.int32), sub)
    return directory


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    return make_tokenizer(tmp_path / "tokenizer.json")


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return make_shards(tmp_path / "data")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # Two cores: keep tests from oversubscribing them.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def tree(pid: int) -> list[int]:
    """The descendants of `pid` (Linux /proc)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(c) for c in (task / "children").read_text().split()]
    return kids + [d for k in kids for d in tree(k)]


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: int):
    """A real tmpfs of `size` bytes at tmp_path/small_disk, for a disk that fills mid-save; mounting needs root, so
    the test is skipped elsewhere."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE tokenizer as `encoder-train tokenizer` trains it."""
    folder = tmp_path_factory.mktemp("bpe")
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(TEXT.format(i=i) for i in range(200)), encoding="utf-8")
    return train_tokenizer([corpus], folder / "tokenizer.json", vocab_size=300)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny encoder pretrained for a few steps by `encoder-train train`."""
    root = tmp_path_factory.mktemp("pretrain")
    (root / "c.yaml").write_text(PRETRAIN)
    rc = main(["train", "--config_file", str(root / "c.yaml"), "--data_dir", str(make_shards(root / "data")),
               "--tokenizer_filepath", str(make_tokenizer(root / "tok.json")), "--checkpoint_dir", str(root / "ckpt")])
    assert rc == 0
    return root / "ckpt" / "checkpoint_00000008.pt"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A real S3-compatible server for the module's tests; they are skipped where boto3, s3fs or moto are missing."""
    from helpers.s3 import Moto

    server = Moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def aws(moto, monkeypatch, tmp_path):
    """The trainer's credentials in the environment, and nothing from this machine's own AWS setup."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credentials from a cloud machine's metadata
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ENCODER_TRAIN_RETRY_SECONDS", "1")
    return moto

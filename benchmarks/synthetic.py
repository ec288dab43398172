"""Synthetic data for the benchmarks: a word-level tokenizer, Zipf-drawn rows with a motif, their shard.

Ids follow `encoder_train.tokenizer.word_level_tokenizer`: RoBERTa's specials `<s> <pad> </s> <unk>
<mask>` at 0..4, then the words 5..V-1. Rows of real length uniform in [0.4 L, L], `<s>` first, `</s>`
last, `<pad>` after; each repeats a motif of 4 to 16 Zipf-drawn words (rank^-1.1), so that a model has
something to learn beyond word frequencies (copying needs attention).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from workload import MASK_PROBABILITY, SEED

from encoder_train.batch import MaskSpec
from encoder_train.data.order import RowOrder
from encoder_train.data.shards import scan_shards
from encoder_train.tokenizer import word_level_tokenizer

BOS, PAD, EOS, MASK = 0, 1, 2, 4
FIRST_WORD = 5  # ids 0..4 are the special tokens


def write_tokenizer(path: Path, vocab: int) -> Path:
    """A word-level tokenizer: the five specials at ids 0..4, then words w5..w{vocab-1}."""
    word_level_tokenizer(vocab).save(str(path))
    return path


def mask_spec(vocab: int) -> MaskSpec:
    """Masking for these ids: 15% of the words, never a special token."""
    return MaskSpec(pad_id=PAD, mask_id=MASK, special_ids=tuple(range(FIRST_WORD)), vocab_size=vocab,
                    probability=MASK_PROBABILITY)


def zipf(vocab: int) -> torch.Tensor:
    """Probabilities of the words (ids 5..vocab-1, most frequent first): rank^-1.1, normalised."""
    weights = 1.0 / torch.arange(1, vocab - FIRST_WORD + 1, dtype=torch.float64) ** 1.1
    return weights / weights.sum()


def unigram_entropy(vocab: int) -> float:
    """Entropy (nats) of the words' Zipf law: the loss a model knowing only word frequencies reaches."""
    p = zipf(vocab)
    return float(-(p * p.log()).sum())


def make_rows(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """(n, seq_len) int32: <s>, a repeated motif of Zipf-drawn words, </s>, right-padded with <pad>."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(math.ceil(0.4 * seq_len), seq_len + 1, (n,), generator=g)
    motif_lengths = torch.randint(4, 17, (n,), generator=g)
    words = torch.multinomial(zipf(vocab), n * 16, replacement=True, generator=g).view(n, 16) + FIRST_WORD
    rows = torch.full((n, seq_len), PAD, dtype=torch.int32)
    for i, (length, m) in enumerate(zip(lengths.tolist(), motif_lengths.tolist(), strict=True)):
        body = words[i, :m].repeat(seq_len // m + 1)[: length - 2]
        rows[i, 0], rows[i, 1 : length - 1], rows[i, length - 1] = BOS, body.to(torch.int32), EOS
    return rows


def write_shard(directory: Path, rows: torch.Tensor) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rows, directory / "shard_000.pt")
    return directory


def rows_in_loader_order(data_dir: Path, seq_len: int, count: int, seed: int = SEED) -> list[torch.Tensor]:
    """The first `count` rows encoder-train's loader reads (with this seed, one shard), padding removed."""
    shards = scan_shards(data_dir, seq_len)
    order = RowOrder(shards, seed, shuffle_files=1)
    table = torch.load(shards[0].path, weights_only=True)
    out = []
    for position in range(count):
        shard, row = order.locate(position)
        assert shard == 0
        r = table[row]
        out.append(r[r != PAD].long())
    return out

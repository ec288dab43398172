"""A bounded, reproducible sample of a corpus too large to read whole, for tokenizer training.

Two knobs, alone or together:

- `rate` (`--sample_rate p`): each document is kept when a seeded hash of its text falls below p. The choice is a
  function of (seed, the document's text) alone: the same documents are kept every time, whatever the files' order
  or how the corpus is split into files, and a document that appears twice is kept or dropped twice.
- `max_bytes` (`--max_bytes N`): the sample holds at most N bytes of text (UTF-8), and reading stops once it is
  full. To spread it over the inputs rather than take the first files, each input gets an equal share of what is
  left (the budget left / the inputs left), taken from its start (kept documents in order, the last one cut to fit);
  an input with less text than its share passes the rest on to the inputs after it. So each file is read for at
  most its share (its share / p with a rate), and a corpus of 10,000 files sampled to 1 GB reads about 100 KB of
  text from each: the files' heads, which for the shuffled shards that open corpora ship is a fair sample.

Documents are what textfiles.iter_texts yields (paragraphs, .jsonl records, Parquet values, cut at 1 MB).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from encoder_train.errors import UserError
from encoder_train.seeds import derive_seed
from encoder_train.textfiles import check_formats, check_inputs, iter_texts


@dataclass(frozen=True)
class Sampling:
    max_bytes: int | None = None  # at most this many bytes of text in the sample; None: no bound
    rate: float = 1.0  # the probability that a document is kept
    seed: int = 0  # which documents a rate keeps

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise UserError(f"--sample_rate {self.rate} is not a probability in (0, 1]; pass e.g. --sample_rate 0.01.")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise UserError(f"--max_bytes {self.max_bytes} is not a positive number of bytes; pass e.g. "
                            "--max_bytes 1000000000 (1 GB of text).")

    def keeps(self, data: bytes) -> bool:
        """Whether the document whose UTF-8 bytes are `data` is in the sample (always, at rate 1)."""
        if self.rate >= 1.0:
            return True
        key = derive_seed(self.seed, "sample").to_bytes(8, "little")  # any integer seed, as 8 bytes
        digest = hashlib.blake2b(data, digest_size=8, key=key).digest()
        return int.from_bytes(digest, "little") < self.rate * 2**64


@dataclass
class SampleReport:
    """What a sample took, filled in as it is read."""

    documents: int = 0
    text_bytes: int = 0


def sample_texts(inputs: Sequence[Any], sampling: Sampling, report: SampleReport,
                 text_field: str = "text") -> Iterator[str]:
    """The sampled documents of `inputs` (paths, or whatever textfiles.iter_texts reads), in input order."""
    if sampling.max_bytes is None:
        yield from _kept(iter_texts(inputs, text_field=text_field), sampling, report, None)
    else:
        yield from _shared(list(inputs), sampling, report, text_field)
    if report.documents == 0:
        raise UserError(f"the sample of {len(inputs)} input file(s) holds no text (--sample_rate {sampling.rate}"
                        f"{f', --max_bytes {sampling.max_bytes}' if sampling.max_bytes else ''}); raise the rate or "
                        "pass inputs with text.")


def _shared(inputs: list[Any], sampling: Sampling, report: SampleReport, text_field: str) -> Iterator[str]:
    """Each input's share of the byte budget, one input after another; reading an input stops at its share."""
    check_inputs(inputs)  # all of them, before spending time on the first
    check_formats(inputs, text_field)
    left = sampling.max_bytes
    for i, path in enumerate(inputs):
        share = left // (len(inputs) - i)
        if share == 0:
            continue
        documents = iter_texts([path], text_field=text_field)
        taken = 0
        try:
            for text in _kept(documents, sampling, report, share):
                taken += len(text.encode())
                yield text
        except UserError as e:
            if " holds no text;" not in str(e):  # an empty input: nothing to take, its share passes on
                raise
        finally:
            documents.close()  # stop reading this file
        left -= taken


def _kept(documents: Iterator[str], sampling: Sampling, report: SampleReport, share: int | None) -> Iterator[str]:
    """The documents `sampling` keeps, until `share` bytes are taken (the last one cut to fit at a character)."""
    taken = 0
    for text in documents:
        data = text.encode()
        if not sampling.keeps(data):
            continue
        if share is not None and taken + len(data) >= share:
            text = data[: share - taken].decode("utf-8", "ignore")
            data = text.encode()
        if data:
            report.documents += 1
            report.text_bytes += len(data)
            taken += len(data)
            yield text
        if share is not None and taken >= share:
            return

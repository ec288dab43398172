"""Tab-separated files of text pairs that the retrieval and STS kinds read, checked line by line.

    training pairs (retrieval's train_file)   a header, then `query<TAB>positive` or `query<TAB>positive<TAB>negative`
    scored pairs (sts's data_file, train_file) a header naming sentence1, sentence2 and score (GLUE's STS-B .tsv,
                                               whatever other columns it has), or any 3-column header: the columns
                                               are then sentence1, sentence2, score in that order

No quoting: a quote is text, as in GLUE's files. Every mistake is one sentence naming the file and the line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from encoder_train.errors import UserError

PAIR_COLUMNS = ("anchor", "positive", "negative")  # the dataset columns the contrastive losses read, in order
STS_COLUMNS = ("sentence1", "sentence2", "score")


@dataclass(frozen=True)
class TrainPairs:
    """A contrastive training file: each row (query, positive) or (query, positive, negative)."""

    columns: tuple[str, ...]  # PAIR_COLUMNS[:2] or PAIR_COLUMNS
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class ScoredPairs:
    """Sentence pairs with a similarity score each (STS-B: 0 to 5)."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]


def read_train_pairs(path: Path) -> TrainPairs:
    lines = _rows(path)
    number, header = next(lines, (0, []))
    if len(header) not in (2, 3):
        raise UserError(f"{path} line {number or 1}: the header has {len(header)} tab-separated columns; a pairs "
                        "file starts with a header of 2 (query, positive) or 3 (query, positive, negative) columns.")
    rows = []
    for number, cells in lines:
        if len(cells) != len(header):
            raise UserError(f"{path} line {number} has {len(cells)} tab-separated fields where the header has "
                            f"{len(header)}; every row is `query<TAB>positive` (<TAB>negative when the header has 3).")
        if not all(c.strip() for c in cells):
            raise UserError(f"{path} line {number} has an empty field; every query, positive and negative needs text.")
        rows.append(tuple(cells))
    if not rows:
        raise UserError(f"{path} holds no pair after its header; add `query<TAB>positive` rows.")
    return TrainPairs(PAIR_COLUMNS[: len(header)], rows)


def read_scored_pairs(path: Path) -> ScoredPairs:
    lines = _rows(path)
    number, header = next(lines, (0, []))
    names = [h.strip() for h in header]
    if all(c in names for c in STS_COLUMNS):
        where = [names.index(c) for c in STS_COLUMNS]
    elif len(names) == 3:
        where = [0, 1, 2]
    else:
        raise UserError(f"{path} line {number or 1}: the header names neither sentence1, sentence2 and score nor 3 "
                        "columns; give a header `sentence1<TAB>sentence2<TAB>score` (GLUE's STS-B files have it).")
    pairs = ScoredPairs([], [], [])
    for number, cells in lines:
        if len(cells) != len(header):
            raise UserError(f"{path} line {number} has {len(cells)} tab-separated fields where the header has "
                            f"{len(header)}; give every row the header's columns.")
        first, second, score_text = (cells[i] for i in where)
        if not (first.strip() and second.strip()):
            raise UserError(f"{path} line {number} has an empty sentence; every pair needs two texts.")
        try:
            score = float(score_text)
        except ValueError:
            raise UserError(f"{path} line {number}: score {score_text!r} is not a number; give each pair a number "
                            "(STS-B: 0 to 5).") from None
        if not math.isfinite(score):
            raise UserError(f"{path} line {number}: score {score_text!r} is not a finite number; give a number.")
        pairs.sentence1.append(first)
        pairs.sentence2.append(second)
        pairs.scores.append(score)
    if len(set(pairs.scores)) < 2:
        raise UserError(f"{path} needs at least two pairs with different scores (it has {len(pairs.scores)} "
                        "pairs): a rank correlation compares orders.")
    return pairs


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number from 1, tab-separated cells) of each non-blank line, streamed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a tab-separated file with a header row.")
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line.rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8 (e.g. with iconv).") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check the file and its permissions.") from None

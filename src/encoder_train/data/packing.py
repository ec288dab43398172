"""Micro-batches of a fixed token budget: rows packed end to end without padding, every batch the same shape.

On a GPU a step of fixed shapes can be compiled once (and captured in a CUDA graph) instead of launching
kernels one by one for each new batch length. Stages:

    the row stream (RowOrder, as for row batches)
      -> windows of `window` consecutive rows
      -> best-fit decreasing of the rows' lengths into bins of `budget - 1` tokens (`best_fit`)
      -> one Batch per bin (`pack`): the rows, each masked as in any batch (seeded by its stream position),
         end to end in a (1, budget) line, then filler: pad tokens in segments no longer than a row, the
         last token always filler. cu_seqlens is padded with empty segments to `budget + 1` entries,
         `positions` gives each token's place in its row, and the predicted positions are padded up to a
         multiple of `predict_bucket` with the last (filler) token, whose label is -100: the loss ignores
         them, so it means what it always does (the sum over predicted tokens, divided by their count).

Every shape is then fixed by (budget, predict bucket count): a handful of shapes in a whole run.

The data position is (first row of the current window, bins of it consumed) and is exact on resume like
the row position of row batches: a window's bins are a pure function of its rows. Under torchrun rank r
takes bins r, r + W, ... of the one global sequence of bins; each batch carries `resume_at`, the position
after its round of W bins, which the loop stores at the end of a step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from encoder_train.batch import IGNORE_INDEX, Batch, MaskSpec
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.loader import DataError, RowSource
from encoder_train.data.masking import mask_tokens
from encoder_train.data.mixture import Share
from encoder_train.errors import UserError
from encoder_train.seeds import derive_seed


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed into bins of `capacity`: longest first, each into the fullest bin it still
    fits (a new bin when none has room). Ties go to the earlier bin: deterministic."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def pack(rows: list[torch.Tensor], positions: list[int], spec: MaskSpec, seed: int, budget: int,
         max_row: int, predict_bucket: int) -> Batch:
    """Rows (each (L_i,) real tokens, no padding) -> one Batch of exactly `budget` tokens (see the module)."""
    special = torch.tensor(spec.special_ids, dtype=torch.long)
    ids = torch.full((budget,), spec.pad_id, dtype=torch.long)
    labels = torch.full((budget,), IGNORE_INDEX, dtype=torch.long)
    place = torch.zeros(budget, dtype=torch.long)
    cu = torch.full((budget + 1,), budget, dtype=torch.int32)  # trailing empty segments
    cu[0], start, seg = 0, 0, 0
    for row, position in zip(rows, positions, strict=True):
        g = torch.Generator().manual_seed(derive_seed(seed, "mask", position))
        masked, target = mask_tokens(row[None].long(), mask_probability=spec.probability, mask_id=spec.mask_id,
                                     special_ids=special, vocab_size=spec.vocab_size, generator=g)
        n = len(row)
        ids[start : start + n], labels[start : start + n] = masked[0], target[0]
        place[start : start + n] = torch.arange(n)
        start, seg = start + n, seg + 1
        cu[seg] = start
    real = start
    while start < budget:  # filler segments of pads, none longer than a row: attention stays row-sized
        n = min(max_row, budget - start)
        place[start : start + n] = torch.arange(n)
        start, seg = start + n, seg + 1
        cu[seg] = start
    predicted = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    slots = -(-max(len(predicted), 1) // predict_bucket) * predict_bucket
    padded = torch.full((slots,), budget - 1, dtype=torch.long)  # the last token: filler, label -100
    padded[: len(predicted)] = predicted
    return Batch(
        input_ids=ids[None],
        attention_mask=torch.ones(1, budget, dtype=torch.bool),  # every slot is a token of some segment
        labels=labels[None],
        predict_positions=padded,
        num_tokens=real,
        num_predicted=len(predicted),
        first_row=positions[0] if positions else 0,
        token_index=torch.arange(budget),
        cu_seqlens=cu,
        max_seqlen=max_row,
        positions=place,
    )


class TokenBudgetBatches(IterableDataset):
    """Endless batches of `budget` tokens from the row stream, from data position `start` = (first row of a
    window, bins of it consumed); this rank takes every `stride`-th bin, from the `rank`-th on."""

    def __init__(self, shards: list[ShardInfo], spec: MaskSpec, *, budget: int, window: int, seed: int,
                 shuffle_files: int, start: tuple[int, int] = (0, 0), rank: int = 0, stride: int = 1,
                 predict_bucket: int = 64):
        self.shards, self.spec, self.budget, self.window = shards, spec, budget, window
        self.seed, self.shuffle_files, self.start = seed, shuffle_files, start
        self.rank, self.stride, self.predict_bucket = rank, stride, predict_bucket
        self.max_row = max(s.width for s in shards)
        if self.max_row > budget - 1:
            raise UserError(
                f"data.batch_tokens ({budget}) must exceed the longest row ({self.max_row} tokens) by at least one; "
                f"raise it to {self.max_row + 1} or more (a multiple of 64 keeps the matmuls aligned)."
            )

    def __iter__(self) -> Iterator[Batch | DataError]:
        share = Share(self.rank, self.stride)
        source = RowSource(self.shards, self.spec, self.seed, self.shuffle_files)
        window_start, skip = self.start
        g = 0  # global bins since `start`
        try:
            while True:
                try:
                    rows = [source.row(p) for p in range(window_start, window_start + self.window)]
                except UserError as e:
                    yield DataError(str(e))
                    return
                rows = [r[r != self.spec.pad_id] for r in rows]  # right-padded rows -> their real tokens
                bins = best_fit([len(r) for r in rows], self.budget - 1)
                for b in range(skip, len(bins)):
                    if share.take(g):
                        chosen = sorted(bins[b])  # stream order within a bin
                        batch = pack([rows[i] for i in chosen], [window_start + i for i in chosen], self.spec,
                                     self.seed, self.budget, self.max_row, self.predict_bucket)
                        end = b + self.stride - self.rank  # the bin after this batch's round
                        batch.resume_at = ((window_start, end) if end < len(bins)
                                           else (window_start + self.window, end - len(bins)))
                        yield batch
                    g += 1
                skip = max(0, skip - len(bins))  # a resume position past this window's bins runs on
                window_start += self.window
        finally:
            source.close()


def packing_efficiency(shards: list[ShardInfo], spec: MaskSpec, *, budget: int, window: int, seed: int,
                       shuffle_files: int, windows: int = 4) -> float:
    """Real tokens / token slots over the first `windows` windows: how full the bins are."""
    source = RowSource(shards, spec, seed, shuffle_files)
    try:
        real = slots = 0
        for w in range(windows):
            lengths = [int((source.row(p) != spec.pad_id).sum()) for p in range(w * window, (w + 1) * window)]
            real += sum(lengths)
            slots += len(best_fit(lengths, budget - 1)) * budget
        return real / slots
    finally:
        source.close()

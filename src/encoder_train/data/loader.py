"""Batches from shards: background workers read rows, trim, mask and collate; the loop only consumes.

Stages: shards (read with pread, or from object storage a block of rows at a time: `ShardReader`) -> RowOrder
(which rows make batch i) -> rows gathered and trimmed to the longest row -> dynamic masking -> a `Batch`
(batch.py) -> DataLoader workers with prefetch (and pinned memory on CUDA).

Which rows make which batch, from one source or several, is data/mixture.py's (row batches) and
data/packing.py's (token-budget batches); a row's mask is seeded by its position in its stream, so each pass
over a row masks it anew, reproducibly.
"""

from __future__ import annotations

import signal
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset

from encoder_train.batch import IGNORE_INDEX, Batch, MaskSpec
from encoder_train.data.blocks import BlockCache
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.masking import mask_tokens
from encoder_train.data.order import RowOrder
from encoder_train.data.shards import ShardReader, check_values
from encoder_train.errors import UserError
from encoder_train.seeds import derive_seed


@dataclass
class DataError:
    """A shard failed validation inside a worker; sent as data so the main process can raise UserError."""

    message: str


def collate(rows: list[torch.Tensor] | torch.Tensor, spec: MaskSpec, seed: int = 0, first_row: int = 0, *,
            row_seeds: list[int] | None = None, probability: float | None = None) -> Batch:
    """Right-padded rows of ids (each (W_i,), widths may differ) -> a masked Batch trimmed to its longest row.

    Each row is masked with its own generator, seeded from (seed, its position in the stream), or by
    `row_seeds` (one per row; a mixture seeds by source and position): a row's mask does not depend on which
    batch it lands in, so one process with batch 2b and two with batch b see the same masks, and so do
    evaluations with different batch sizes. `probability`: the mask rate (default the spec's; a schedule
    changes it during a run).
    """
    rate = spec.probability if probability is None else probability
    B, W = len(rows), max(len(r) for r in rows)
    special = torch.tensor(spec.special_ids, dtype=torch.long)
    inputs = torch.full((B, W), spec.pad_id, dtype=torch.long)
    labels = torch.full((B, W), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        g = torch.Generator().manual_seed(row_seeds[i] if row_seeds else derive_seed(seed, "mask", first_row + i))
        masked, target = mask_tokens(row[None].long(), mask_probability=rate, mask_id=spec.mask_id,
                                     special_ids=special, vocab_size=spec.vocab_size, generator=g)
        inputs[i, : len(row)], labels[i, : len(row)] = masked[0], target[0]
    # Masking never creates or removes a pad, so the pads still mark the padding. Trim: (B, W) -> (B, T).
    real = inputs != spec.pad_id
    width = int(torch.nonzero(real.any(0)).max()) + 1 if real.any() else 1
    inputs, labels, real = inputs[:, :width], labels[:, :width], real[:, :width]
    positions = torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).squeeze(1)
    batch = Batch(
        input_ids=inputs,
        attention_mask=real,
        labels=labels,
        predict_positions=positions,
        num_tokens=int(real.sum()),
        num_predicted=len(positions),
        first_row=first_row,
    )
    lengths = real.sum(1)
    batch.token_index = torch.nonzero(real.reshape(-1)).squeeze(1)
    batch.cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    batch.max_seqlen = int(lengths.max())
    return batch


class RowSource:
    """Rows by their position in the endless stream: `RowOrder` says where a row lies, and the shards are
    opened on first use (their ids checked then), a bounded number at a time.

    Shards in object storage share one `BlockCache`, and each row asked for also schedules the blocks of the rows
    up to LOOKAHEAD_ROWS positions further on (a second RowOrder walks ahead: the order is known in advance), so
    blocks arrive before the batch that needs them, including those of the next window of files."""

    LOOKAHEAD_ROWS = 4096

    def __init__(self, shards: list[ShardInfo], spec: MaskSpec, seed: int, shuffle_files: int):
        self.shards, self.spec, self.shuffle_files = shards, spec, shuffle_files
        self.order = RowOrder(shards, seed, shuffle_files)
        self.opened: OrderedDict[int, ShardReader] = OrderedDict()  # shard index -> open reader, LRU
        self.checked: set[int] = set()
        remote = any(s.store is not None for s in shards)
        self.cache = BlockCache() if remote else None
        self._ahead_order = RowOrder(shards, seed, shuffle_files) if remote else None
        self._ahead = 0  # positions before this one have had their blocks scheduled
        self._remote: dict[int, ShardReader] = {}  # shard index -> reader (remote readers hold no OS resource)

    def row(self, position: int) -> torch.Tensor:
        """(width,) int64: the row at `position`, right-padded."""
        if self.cache is not None:
            self._read_ahead(position)
        shard, row = self.order.locate(position)
        if shard not in self.opened:
            reader = self._reader(shard)
            if shard not in self.checked:  # each shard's ids are checked once per worker, on first use
                check_values(reader.info.path, reader, self.spec.vocab_size, self.spec.pad_id, self.spec.special_ids)
                self.checked.add(shard)
            self.opened[shard] = reader
            if len(self.opened) > 2 * self.shuffle_files:  # bound the open files
                self.opened.popitem(last=False)[1].close()
        self.opened.move_to_end(shard)
        return self.opened[shard].row(row)

    def _reader(self, shard: int) -> ShardReader:
        if self.cache is None:
            return ShardReader(self.shards[shard])
        if shard not in self._remote:
            self._remote[shard] = ShardReader(self.shards[shard], self.cache)
        return self._remote[shard]

    def _read_ahead(self, position: int) -> None:
        """Schedule the blocks of positions up to LOOKAHEAD_ROWS ahead, as far as the fetches in flight allow."""
        self._ahead = max(self._ahead, position + 1)
        end = position + 1 + self.LOOKAHEAD_ROWS
        while self._ahead < end and self.cache.room():
            shard, row = self._ahead_order.locate(self._ahead)
            reader = self._reader(shard)
            self.cache.prefetch(reader, row // reader.block_rows)
            self._ahead += 1

    def close(self) -> None:
        for reader in self.opened.values():
            reader.close()
        if self.cache is not None:
            self.cache.close()


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores SIGTERM and SIGINT. A scheduler (torchrun, SLURM, a shell's Ctrl-C) signals the whole
    process group, workers included; a worker that died of it would take the run down before the training process,
    which handles the signal, finishes its step and saves. The training process stops its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchStream:
    """Batches from background workers; a shard error raised in a worker becomes a UserError here."""

    def __init__(self, dataset: IterableDataset, *, num_workers: int, prefetch: int, pin_memory: bool):
        loader = DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=num_workers,
            prefetch_factor=prefetch if num_workers > 0 else None,
            pin_memory=pin_memory,
            # Its own generator: creating the iterator must not draw from the global RNG, which drives
            # dropout and is restored exactly on resume.
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_leave_signals_to_the_trainer,
        )
        self._it = iter(loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        try:
            item = next(self._it)
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            # A worker killed from outside (the out-of-memory killer, a signal): say so in one sentence.
            self.close()
            raise UserError(f"a data-loading worker process died ({str(e).splitlines()[0].rstrip('. ')}); "
                            "check the machine's memory, or set data.num_workers: 0.") from None
        if isinstance(item, DataError):
            self.close()
            raise UserError(item.message)
        return item

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

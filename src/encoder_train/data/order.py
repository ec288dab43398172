"""The order of a source's rows: a pure function of (seed, shard list, position).

That is what makes resume exact and instant: the data position in a checkpoint is one integer per source, the rows
it has given. Epoch e shuffles the file order, groups consecutive files into windows of `shuffle_files`, and
shuffles the rows within each window. The rows of all epochs form one endless stream; batch i is rows
[i*B, (i+1)*B) of it, wherever that falls.
"""

from __future__ import annotations

import bisect

import torch

from encoder_train.data.formats.base import ShardInfo
from encoder_train.seeds import derive_seed


class RowOrder:
    """Maps a position in the endless row stream to (shard index, row), without reading data.

    Only the current epoch's file order and one window's row permutation are held: memory is
    O(rows in a window), whatever the dataset size.
    """

    def __init__(self, shards: list[ShardInfo], seed: int, shuffle_files: int):
        self.rows = [s.rows for s in shards]
        self.rows_per_epoch = sum(self.rows)
        self.seed = seed
        self.shuffle_files = shuffle_files
        self._epoch: int | None = None
        self._window: tuple[int, int] | None = None

    def _plan_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "files", epoch))
        order = torch.randperm(len(self.rows), generator=g).tolist()
        self._windows = [order[i : i + self.shuffle_files] for i in range(0, len(order), self.shuffle_files)]
        sizes = [sum(self.rows[f] for f in w) for w in self._windows]
        self._window_starts = [0]
        for s in sizes[:-1]:
            self._window_starts.append(self._window_starts[-1] + s)
        self._epoch = epoch

    def _plan_window(self, epoch: int, w: int) -> None:
        files = self._windows[w]
        g = torch.Generator().manual_seed(derive_seed(self.seed, "rows", epoch, w))
        total = sum(self.rows[f] for f in files)
        self._perm = torch.randperm(total, generator=g).tolist()
        self._file_starts = [0]
        for f in files[:-1]:
            self._file_starts.append(self._file_starts[-1] + self.rows[f])
        self._window = (epoch, w)

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, row index) of the row at `position` in the endless stream."""
        epoch, offset = divmod(position, self.rows_per_epoch)
        if self._epoch != epoch:
            self._plan_epoch(epoch)
        w = bisect.bisect_right(self._window_starts, offset) - 1
        if self._window != (epoch, w):
            self._plan_window(epoch, w)
        j = self._perm[offset - self._window_starts[w]]
        k = bisect.bisect_right(self._file_starts, j) - 1
        return self._windows[w][k], j - self._file_starts[k]

"""Reading shards: every shard of a data folder found and its header checked (`scan_shards`), then its rows read
(`ShardReader`) and its ids checked once (`check_values`), whatever its format (data/formats/).

A format's header says where row r's ids lie in the file; `ShardReader` reads them with pread(2), a few rows at a
time, so a dataset larger than RAM streams through the page cache and memory stays bounded. Not through a memory
map: a mapped file that shrinks while it is read (a re-run of `pretokenize`, an rsync, a full disk) kills the
process with SIGBUS, which no Python code can catch, so the run would die without a message or a checkpoint. A read
past the end of a file returns short instead, and becomes one sentence naming the file while the loop saves the
last step.

Shards in object storage (an fsspec URL, data/store.py) have their headers parsed from ranged reads, and their rows
are read a block (`BLOCK_BYTES` of consecutive rows) at a time into a `BlockCache` (data/blocks.py), fetched ahead
of use on a few threads, so a row costs no request of its own and the training step does not wait on the network.
Which rows come in which order is data/order.py's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder_train.data import manifest
from encoder_train.data.blocks import FETCH_THREADS, BlockCache, cache_budget
from encoder_train.data.formats import format_for
from encoder_train.data.formats.base import ID_DTYPES, ShardInfo
from encoder_train.data.store import (
    LocalFile,
    LocalStore,
    RemoteStore,
    find_shards,
    open_store,
    relative,
    retry_seconds,
)
from encoder_train.errors import UserError

BLOCK_BYTES = 4 << 20  # a remote read: this many bytes of consecutive rows (one row at least)
READ_AHEAD = 2  # blocks a remote reader fetches past the last one asked for


class ShardReader:
    """The rows of one shard, as int64: a local file's with pread(2) from an open file descriptor, a remote
    object's a block of rows at a time through a `BlockCache`.

    See the module's docstring for why this never reads through a memory map. A local row costs one system
    call (a few microseconds; `benchmarks/loader_overhead.py` measures the whole loader against batches
    held in memory). A local shard whose ids cannot be read in place is loaded whole, once, into memory.
    `cache`: the blocks of a remote shard (a RowSource shares one among its shards); a private one by default.
    """

    def __init__(self, info: ShardInfo, cache: BlockCache | None = None):
        self.info = info
        self._np_dtype = ID_DTYPES[info.dtype]
        self._file: Any = None
        self._whole: torch.Tensor | None = None
        if info.store is not None:  # remote: read in place (scan_shards accepts nothing else), no OS resource
            self._file = info.store.open(info.path)
            self.cache = cache if cache is not None else BlockCache()
            self.block_rows = max(1, BLOCK_BYTES // (max(info.row_stride, info.width) * self._np_dtype.itemsize))
            self.blocks = -(-info.rows // self.block_rows)
            return
        try:
            if info.offset is None:
                self._whole = format_for(info.path).load(info.path)
                if not isinstance(self._whole, torch.Tensor) or tuple(self._whole.shape) != (info.rows, info.width):
                    raise UserError(f"data file {info.path} changed since training started; restore it.")
            else:
                self._file = LocalFile(info.path)
        except OSError as e:
            raise UserError(
                f"data file {info.path} can no longer be read ({e.strerror}); restore it."
            ) from None

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) as a (count, width) int64 tensor."""
        info = self.info
        if self._whole is not None:
            return self._whole[start : start + count].long()
        if info.store is not None:
            return self._remote_rows(start, count)
        width, item = info.width, self._np_dtype.itemsize
        if info.row_stride == width:  # contiguous rows: one read
            return self._read(info.offset + start * width * item, count * width, start).reshape(count, width)
        return torch.stack([self._read(info.offset + (start + i) * info.row_stride * item, width, start + i)
                            for i in range(count)])

    def row(self, index: int) -> torch.Tensor:
        """One row, (width,) int64."""
        return self.rows(index, 1)[0]

    def chunks(self, max_bytes: int = 1 << 24) -> Iterator[torch.Tensor]:
        """Every row, in order, a bounded chunk of rows at a time."""
        step = max(1, max_bytes // (self.info.width * self._np_dtype.itemsize))
        for start in range(0, self.info.rows, step):
            yield self.rows(start, min(step, self.info.rows - start))

    def _read(self, offset: int, count: int, row: int) -> torch.Tensor:
        want = count * self._np_dtype.itemsize
        try:
            buf = self._file.read(offset, want)
        except OSError as e:
            raise UserError(f"data file {self.info.path} could not be read at row {row} ({e.strerror}); "
                            "restore it.") from None
        if len(buf) < want:
            raise UserError(
                f"data file {self.info.path} became shorter while training (row {row} now lies past its end): "
                "it was truncated or rewritten during the run; restore it."
            )
        return torch.from_numpy(np.frombuffer(buf, dtype=self._np_dtype).astype(np.int64))

    # ---- remote shards ----

    def _remote_rows(self, start: int, count: int) -> torch.Tensor:
        br = self.block_rows
        first, last = start // br, (start + count - 1) // br
        for k in range(first, min(last + 1 + READ_AHEAD, self.blocks)):  # what is needed, then a little more
            self.cache.prefetch(self, k)
        parts = [self.cache.get(self, k) for k in range(first, last + 1)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        lo = start - first * br
        return torch.from_numpy(block[lo : lo + count].astype(np.int64))

    def fetch(self, k: int) -> np.ndarray:
        """Block k: rows [k * block_rows, ...) as a (rows, width) array of the stored dtype (one ranged read)."""
        info, item, br = self.info, self._np_dtype.itemsize, self.block_rows
        first = k * br
        n = min(br, info.rows - first)
        stride = info.row_stride * item
        want = (n - 1) * stride + info.width * item
        data = self._file.read(info.offset + first * stride, want, f" at row {first}")
        if len(data) < want:
            raise UserError(
                f"data file {info.path} became shorter while training (row {first + len(data) // stride} now lies "
                "past its end): it was truncated or rewritten during the run; restore it."
            )
        flat = np.frombuffer(data, dtype=self._np_dtype)
        if info.row_stride == info.width:
            return flat.reshape(n, info.width)
        return np.lib.stride_tricks.as_strided(flat, shape=(n, info.width), strides=(stride, item), writeable=False)

    def close(self) -> None:
        if self._file is not None and self.info.store is None:  # a remote reader holds nothing to release
            self._file.close()
            self._file = None


def check_values(
    path: str | Path,
    source: torch.Tensor | ShardReader,
    vocab_size: int,
    pad_id: int | None = None,
    special_ids: Sequence[int] = (),
) -> None:
    """Every id in [0, vocab_size); with `pad_id`, no row all padding and something to mask. Reads the
    whole shard once, a bounded chunk at a time."""
    chunks = source.chunks() if isinstance(source, ShardReader) else [source]
    special = torch.tensor(sorted({*special_ids, *([] if pad_id is None else [pad_id])}), dtype=torch.long)
    row, maskable = 0, 0
    for chunk in chunks:
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0:
            raise UserError(f"data file {path} holds the negative token id {lo}; token ids must be >= 0.")
        if hi >= vocab_size:
            raise UserError(
                f"data file {path} holds token id {hi}, outside the tokenizer's vocabulary of {vocab_size}; "
                "pre-tokenize the data with the model's tokenizer (the one passed to train's --tokenizer_filepath)."
            )
        if pad_id is not None:
            empty = torch.nonzero((chunk == pad_id).all(1)).squeeze(1)
            if len(empty):
                raise UserError(
                    f"data file {path} has rows that are all padding (row {row + int(empty[0])} is the first); "
                    "a row needs at least one token: remove those rows or re-create the file with pretokenize."
                )
            maskable += int((~torch.isin(chunk.long(), special)).sum())
        row += len(chunk)
    if pad_id is not None and maskable == 0:
        raise UserError(
            f"data file {path} holds only special tokens (<s>, </s>, <pad>, ...): there is nothing to mask and "
            "predict in it; remove it or re-create it from text."
        )


def scan_shards(data_dir: str | Path | None, max_tokens: int, flag: str = "--data_dir") -> list[ShardInfo]:
    """Find every shard and check its header (fast: no token is read). `data_dir`: a folder, or a URL
    (data/store.py); a bucket's shards are listed once and their headers read on a few threads. A folder with a
    manifest (data/manifest.py) costs its listing and one read of the manifest, and no shard's header is read."""
    if data_dir is None:
        find_shards(data_dir, flag)  # says what to pass
    store = open_store(data_dir, flag)
    if store.remote:
        cache_budget(), retry_seconds()  # a bad setting is one sentence here, not an error inside a loader worker
    listed = store.list()
    located = manifest.locate(store)
    if located is not None:
        return from_manifest(located, store, listed, max_tokens)
    if not store.remote:
        return [format_for(p).header(p, max_tokens) for p, _ in listed]
    pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="encoder-train-header")
    try:
        futures = [pool.submit(format_for(url).remote_header, store, url, size, max_tokens) for url, size in listed]
        return [f.result() for f in futures]  # the first bad shard in order is the one reported
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def from_manifest(located: manifest.Located, store: LocalStore | RemoteStore, listed: list[tuple[str, int]],
                  max_tokens: int) -> list[ShardInfo]:
    """The listed shards' infos from their manifest entries, once the listing agrees with the manifest (no shard
    missing, none unlisted, every size the same): the fingerprint, order and rows are those of a header scan."""
    prefix = located.folder + "/" if located.folder else ""
    rel = [(prefix + relative(path, store.root), size) for path, size in listed]
    differences = manifest.check_listing(located.manifest, rel, located.folder)
    if differences:
        raise UserError(
            f"data folder {store.root} disagrees with its manifest {located.where}: {differences.describe()}; "
            f"check it with `encoder-train pretokenize --verify --output_dir {located.root}` and re-run that "
            f"pretokenize command to restore the shards, or remove {located.where} to read the shards' own headers."
        )
    entries = {s.path: s for s in located.manifest.shards}
    bucket = store if store.remote else None
    return [manifest.shard_info(entries[r], path, bucket, max_tokens)
            for (r, _), (path, _) in zip(rel, listed, strict=True)]

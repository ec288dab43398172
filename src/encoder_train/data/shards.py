"""Finding, validating and ordering `.pt` shards.

A shard is one 2-D integer tensor `[rows, width]` of token ids, each row right-padded with the pad id,
saved with `torch.save`. Its header (dtype, shape, where the ids lie in the file) is read once, through
a memory map that no id is ever read from; the ids themselves are read by `ShardReader` with pread(2),
a few rows at a time, so a dataset larger than RAM streams through the page cache and memory stays
bounded. Not through a memory map: a mapped file that shrinks while it is read (a re-run of
`pretokenize`, an rsync, a full disk) kills the process with SIGBUS, which no Python code can catch,
so the run would die without a message or a checkpoint. A read past the end of a file returns short
instead, and becomes one sentence naming the file while the loop saves the last step.

The order of rows is a pure function of (seed, shard list, position), which is what makes resume
exact and instant: the data position in a checkpoint is one integer, the number of batches consumed.
Epoch e shuffles the file order, groups consecutive files into windows of `shuffle_files`, and
shuffles the rows within each window. The rows of all epochs form one endless stream; batch i is
rows [i*B, (i+1)*B) of it, wherever that falls.

Shards in object storage (an fsspec URL, data/store.py) are parsed from ranged reads instead: the first and last
64 KB of the object hold the zip's central directory, the tensor's pickled header and the local header of its one
data record, which gives where the ids lie; only a plain tensor whose ids can be read in place is accepted. Their
rows are read a block (`BLOCK_BYTES` of consecutive rows) at a time into a `BlockCache`, fetched ahead of use on a
few threads, so a row costs no request of its own and the training step does not wait on the network.
"""

from __future__ import annotations

import bisect
import io
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder_train.data.store import (  # find_shards: the local listing, imported from here by tools and tests
    LocalFile,
    RemoteStore,
    env_number,
    find_shards,
    open_store,
    retry_seconds,
)
from encoder_train.errors import UserError
from encoder_train.seeds import derive_seed

BLOCK_BYTES = 4 << 20  # a remote read: this many bytes of consecutive rows (one row at least)
HEADER_BYTES = 64 << 10  # a remote shard's header: its first and last 64 KB
FETCH_THREADS = 8  # concurrent remote reads per process
READ_AHEAD = 2  # blocks a remote reader fetches past the last one asked for
CACHE_MB_ENV = "ENCODER_TRAIN_REMOTE_CACHE_MB"
CACHE_MB = 512  # default memory for remote blocks, per data source and loader process


@dataclass(frozen=True)
class ShardInfo:
    path: str
    rows: int
    width: int
    dtype: torch.dtype = torch.int64
    # Where row r lies in the file: bytes [offset + r * row_stride * itemsize, ... + width * itemsize).
    # None: the ids cannot be read in place (legacy format, unusual strides); the reader loads them whole.
    offset: int | None = None
    row_stride: int = 0  # elements between the starts of consecutive rows
    # Where the bytes are: None for a local file (read with pread), else the RemoteStore it was listed from.
    store: RemoteStore | None = field(default=None, compare=False, repr=False)


# Every integer dtype a shard may hold, as numpy reads it from the file's little-endian bytes.
ID_DTYPES = {
    torch.uint8: np.dtype("u1"),
    torch.int8: np.dtype("i1"),
    torch.int16: np.dtype("<i2"),
    torch.int32: np.dtype("<i4"),
    torch.int64: np.dtype("<i8"),
    **{getattr(torch, f"uint{b}"): np.dtype(f"<u{b // 8}") for b in (16, 32, 64) if hasattr(torch, f"uint{b}")},
}


def load_shard(path: str | Path) -> torch.Tensor:
    """Memory-map a shard. Only plain tensors load: `weights_only=True` refuses code-carrying pickles."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"data file {path} is not a plain tensor file (it holds objects that weights_only loading "
            "refuses, which could run code); re-save the token ids with torch.save(tensor, path)."
        ) from None
    except RuntimeError as e:
        if "mmap" in str(e):  # files in the legacy (pre-zip) format cannot be memory-mapped
            obj = _load_unmapped(path)
        else:
            raise UserError(
                f"data file {path} is truncated or not a PyTorch file; re-create it with torch.save."
            ) from None
    except (OSError, EOFError, ValueError):
        raise UserError(f"data file {path} is truncated or unreadable; re-create it with torch.save.") from None
    if not isinstance(obj, torch.Tensor):
        raise UserError(
            f"data file {path} holds a {type(obj).__name__}, not a tensor; each .pt shard must be one "
            "2-D integer tensor [rows, seq_len]."
        )
    return obj


def _load_unmapped(path: str | Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"data file {path} is not a plain tensor file; re-save it with torch.save.") from None
    except Exception:
        raise UserError(f"data file {path} is truncated or unreadable; re-create it with torch.save.") from None


_LOCAL: Any = object()


def check_header(path: str | Path, t: torch.Tensor, max_tokens: int, *, where: Any = _LOCAL,
                 store: RemoteStore | None = None) -> ShardInfo:
    """Checks that need no data read: dtype, rank, width, emptiness; and where the rows lie in the file.
    `where`: the (offset, size) of the ids' record when already known (a remote shard's), else read from `path`."""
    if t.dtype not in ID_DTYPES:
        raise UserError(
            f"data file {path} holds a {str(t.dtype).removeprefix('torch.')} tensor; token ids must be an "
            "integer tensor (int64, int32, int16, or unsigned)."
        )
    if t.dim() != 2:
        raise UserError(
            f"data file {path} holds a {t.dim()}-D tensor of shape {tuple(t.shape)}; each shard must be 2-D "
            "[rows, seq_len]."
        )
    rows, width = t.shape
    if rows == 0 or width == 0:
        raise UserError(f"data file {path} holds an empty tensor of shape {tuple(t.shape)}; remove it.")
    if width > max_tokens:
        raise UserError(
            f"data file {path} has rows of {width} tokens but the model's positions hold at most {max_tokens}; "
            f"re-tokenize with --seq_len {max_tokens} or raise model.max_position_embeddings."
        )
    itemsize = t.element_size()
    check_stored_ids(path, t)
    if where is _LOCAL:
        where = _stored_bytes(path)
    if where is None or t.stride(1) != 1:
        return ShardInfo(str(path), rows, width, t.dtype, store=store)  # read whole by ShardReader
    start, size = where
    end = (t.storage_offset() + (rows - 1) * t.stride(0) + width) * itemsize
    if end > size or t.stride(0) < 0:
        raise UserError(f"data file {path} is truncated or corrupt (its ids end past its data); re-create it.")
    return ShardInfo(str(path), rows, width, t.dtype, start + t.storage_offset() * itemsize, t.stride(0), store)


def check_stored_ids(path: str | Path, t: torch.Tensor) -> None:
    """Refuse a tensor whose shape claims more ids than its file stores. torch.save writes a view's storage, not
    its shape: `x.expand(10**12, w)` (row stride 0), `as_strided` with overlapping rows, or a broadcast column is
    a few bytes on disk whose [rows, width] would be terabytes once rows are counted, ordered and read. Only the
    header is asked (shape, storage size), so nothing is allocated for the claimed rows."""
    claimed = t.numel() * t.element_size()
    stored = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if claimed > stored:
        rows, width = t.shape
        raise UserError(
            f"data file {path} claims {rows:,} rows of {width} tokens ({claimed:,} bytes) but stores only "
            f"{max(stored, 0):,} bytes of ids (it was saved from an expanded or overlapping view, whose rows repeat "
            "the same ids); re-create it with `encoder-train pretokenize`, or save a tensor that holds each row."
        )


def _stored_bytes(path: str | Path | io.RawIOBase) -> tuple[int, int] | None:
    """(file offset, size) of the one storage record of a `torch.save`d tensor, or None when the file is
    not laid out that way (the legacy format, several records, compression, big-endian bytes). `path` may be an
    open file (a remote shard's `_HeaderFile`)."""
    try:
        with zipfile.ZipFile(path) as z:
            records = [i for i in z.infolist() if re.fullmatch(r"[^/]+/data/\d+", i.filename)]
            order = [z.read(i).strip() for i in z.infolist() if i.filename.endswith("/byteorder")]
            if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or order not in ([], [b"little"]):
                return None
            record = records[0]
        if isinstance(path, io.IOBase):
            path.seek(record.header_offset)
            local = path.read(30)
        else:
            with open(path, "rb") as f:
                f.seek(record.header_offset)
                local = f.read(30)  # a zip local file header: fixed 30 bytes, then the name and an extra field
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return record.header_offset + 30 + name_len + extra_len, record.file_size
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


class _HeaderFile(io.RawIOBase):
    """A remote shard as a seekable file for zipfile and torch.load: its first and last HEADER_BYTES are fetched
    once (one request each, one for a small shard), any other byte range on demand."""

    def __init__(self, store: RemoteStore, url: str, size: int):
        self.store, self.url, self.size, self.pos = store, url, size, 0
        self.error: UserError | None = None  # a failed read inside torch.load, whose C++ reader would hide it
        if size <= 2 * HEADER_BYTES:
            self.head, self.tail_at, self.tail = self._fetch(0, size), size, b""
        else:
            self.head = self._fetch(0, HEADER_BYTES)
            self.tail_at = size - HEADER_BYTES
            self.tail = self._fetch(self.tail_at, HEADER_BYTES)

    def _fetch(self, offset: int, length: int) -> bytes:
        try:
            return self.store.read(self.url, offset, length)
        except UserError as e:
            self.error = e
            raise

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        start, end = self.pos, min(self.pos + len(buffer), self.size)
        if end <= start:
            return 0
        if end <= len(self.head):
            data = self.head[start:end]
        elif start >= self.tail_at:
            data = self.tail[start - self.tail_at : end - self.tail_at]
        else:
            data = self._fetch(start, end - start)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def remote_header(store: RemoteStore, url: str, size: int, max_tokens: int) -> ShardInfo:
    """check_header for a shard in object storage, from its first and last bytes (no id is read)."""
    f = _HeaderFile(store, url, size)
    in_place = ("only plain tensors whose ids can be read in place are read from object storage: one 2-D integer "
                "tensor saved by torch.save, uncompressed; re-save it with torch.save(tensor.contiguous(), path) "
                "or train from a local copy")
    if f.head[:4] != b"PK\x03\x04":
        if f.head[:2] == b"\x80\x02" or f.head[:1] == b"\x80":  # a pickle: torch.save's legacy format
            raise UserError(f"data file {url} is in PyTorch's legacy (pre-1.6) format; {in_place}.")
        raise UserError(f"data file {url} is not a PyTorch file (torch.save writes a zip archive); remove it from "
                        f"{store.root} or re-create it with torch.save.")
    try:
        t = torch.load(f, map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"data file {url} is not a plain tensor file (it holds objects that weights_only loading "
            "refuses, which could run code); re-save the token ids with torch.save(tensor, path)."
        ) from None
    except Exception:
        if f.error is not None:
            raise f.error from None
        raise UserError(f"data file {url} is truncated or not a PyTorch file; re-create it with torch.save.") from None
    if not isinstance(t, torch.Tensor):
        raise UserError(
            f"data file {url} holds a {type(t).__name__}, not a tensor; each .pt shard must be one "
            "2-D integer tensor [rows, seq_len]."
        )
    where = _stored_bytes(f)
    if f.error is not None:
        raise f.error
    info = check_header(url, t, max_tokens, where=where, store=store)
    if info.offset is None:
        raise UserError(f"data file {url} cannot be read in place ({in_place}).")
    return info


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
                self._whole = _load_unmapped(info.path)
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


_pools: dict[int, ThreadPoolExecutor] = {}


def fetch_pool() -> ThreadPoolExecutor:
    """This process's threads for remote reads (a forked loader worker makes its own)."""
    pool = _pools.get(os.getpid())
    if pool is None:
        pool = _pools[os.getpid()] = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="encoder-train-fetch")
    return pool


def cache_budget() -> int:
    """Bytes of remote blocks a BlockCache keeps: ENCODER_TRAIN_REMOTE_CACHE_MB, else CACHE_MB."""
    return int(env_number(CACHE_MB_ENV, CACHE_MB, "megabytes") * (1 << 20))


class BlockCache:
    """Blocks of rows of remote shards: fetched on `fetch_pool()`'s threads ahead of use (at most
    2 x FETCH_THREADS in flight), kept within a memory budget, the least recently used dropped first.

    Only the thread that owns it calls it (a loader worker, or the training process); the pool's threads only
    fetch. A failed fetch ahead is forgotten and tried again when its rows are needed, so only an error that
    persists (data/store.py's retries) reaches the batch, as a UserError naming the object.
    """

    def __init__(self, budget: int | None = None):
        self.budget = cache_budget() if budget is None else budget
        self._blocks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[str, int], Future] = {}
        self._bytes = 0

    def room(self) -> bool:
        """Whether another fetch ahead may start now."""
        if len(self._pending) >= 2 * FETCH_THREADS:
            self._collect()
        return len(self._pending) < 2 * FETCH_THREADS

    def prefetch(self, reader: ShardReader, k: int) -> None:
        key = (reader.info.path, k)
        if key not in self._blocks and key not in self._pending and self.room():
            self._pending[key] = fetch_pool().submit(reader.fetch, k)

    def get(self, reader: ShardReader, k: int) -> np.ndarray:
        key = (reader.info.path, k)
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
            return block
        pending = self._pending.pop(key, None)
        block = pending.result() if pending is not None else reader.fetch(k)
        self._keep(key, block)
        return block

    def _collect(self) -> None:
        """Move finished fetches into the cache; drop failed ones (tried again when needed)."""
        for key, f in list(self._pending.items()):
            if f.done():
                del self._pending[key]
                if f.exception() is None:
                    self._keep(key, f.result())

    def _keep(self, key: tuple[str, int], block: np.ndarray) -> None:
        self._blocks[key] = block
        self._blocks.move_to_end(key)
        self._bytes += block.nbytes
        while self._bytes > self.budget and len(self._blocks) > 1:
            self._bytes -= self._blocks.popitem(last=False)[1].nbytes

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._blocks.clear()
        self._bytes = 0


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
    (data/store.py); a bucket's shards are listed once and their headers read on a few threads."""
    if data_dir is None:
        find_shards(data_dir, flag)  # says what to pass
    store = open_store(data_dir, flag)
    if not store.remote:
        return [check_header(p, load_shard(p), max_tokens) for p, _ in store.list()]
    cache_budget(), retry_seconds()  # a bad setting is one sentence here, not an error inside a loader worker
    listed = store.list()
    pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="encoder-train-header")
    try:
        futures = [pool.submit(remote_header, store, url, size, max_tokens) for url, size in listed]
        return [f.result() for f in futures]  # the first bad shard in order is the one reported
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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

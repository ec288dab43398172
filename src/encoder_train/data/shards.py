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
"""

from __future__ import annotations

import bisect
import hashlib
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoder_train.errors import UserError


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


# Every integer dtype a shard may hold, as numpy reads it from the file's little-endian bytes.
ID_DTYPES = {
    torch.uint8: np.dtype("u1"),
    torch.int8: np.dtype("i1"),
    torch.int16: np.dtype("<i2"),
    torch.int32: np.dtype("<i4"),
    torch.int64: np.dtype("<i8"),
    **{getattr(torch, f"uint{b}"): np.dtype(f"<u{b // 8}") for b in (16, 32, 64) if hasattr(torch, f"uint{b}")},
}


def find_shards(data_dir: str | Path | None, flag: str = "--data_dir") -> list[Path]:
    """Every `*.pt` file under `data_dir`, in subfolders too, in a stable (sorted) order."""
    if data_dir is None:
        raise UserError(f"no training data given; pass {flag} with a folder of .pt shards.")
    root = Path(data_dir)
    if root.is_file():
        raise UserError(f"{flag} {root} is a file, not a folder; pass the folder that holds the .pt shards "
                        f"(e.g. {root.parent}).")
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass {flag} with a folder of .pt shards.")
    try:
        found = sorted(root.rglob("*.pt"))
        paths = [p for p in found if p.is_file()]
    except OSError as e:
        raise UserError(f"data folder {root} cannot be searched ({e.strerror}); fix its permissions.") from None
    # A .pt that is not a readable file would silently drop out of the data: a link into an unmounted disk, a pipe.
    for p in found:
        if p.is_symlink() and not p.exists():
            raise UserError(f"data file {p} is a symbolic link to {os.readlink(p)}, which does not exist; mount or "
                            "restore its target, or remove the link.")
        if not p.is_file() and not p.is_dir():
            raise UserError(f"data file {p} is not a regular file (a pipe or a device); remove it from {root}.")
    if not paths:
        raise UserError(
            f"data folder {root} holds no .pt files (searched subfolders too); "
            f"write shards with `encoder-train pretokenize` or point {flag} elsewhere."
        )
    return paths


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


def check_header(path: str | Path, t: torch.Tensor, max_tokens: int) -> ShardInfo:
    """Checks that need no data read: dtype, rank, width, emptiness; and where the rows lie in the file."""
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
    where = _stored_bytes(path)
    if where is None or t.stride(1) != 1:
        return ShardInfo(str(path), rows, width, t.dtype)  # read whole by ShardReader
    start, size = where
    end = (t.storage_offset() + (rows - 1) * t.stride(0) + width) * itemsize
    if end > size or t.stride(0) < 0:
        raise UserError(f"data file {path} is truncated or corrupt (its ids end past its data); re-create it.")
    return ShardInfo(str(path), rows, width, t.dtype, start + t.storage_offset() * itemsize, t.stride(0))


def _stored_bytes(path: str | Path) -> tuple[int, int] | None:
    """(file offset, size) of the one storage record of a `torch.save`d tensor, or None when the file is
    not laid out that way (the legacy format, several records, compression, big-endian bytes)."""
    try:
        with zipfile.ZipFile(path) as z:
            records = [i for i in z.infolist() if re.fullmatch(r"[^/]+/data/\d+", i.filename)]
            order = [z.read(i).strip() for i in z.infolist() if i.filename.endswith("/byteorder")]
            if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or order not in ([], [b"little"]):
                return None
            record = records[0]
        with open(path, "rb") as f:
            f.seek(record.header_offset)
            local = f.read(30)  # a zip local file header: fixed 30 bytes, then the name and an extra field
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return record.header_offset + 30 + name_len + extra_len, record.file_size
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


class ShardReader:
    """The rows of one shard, read with pread(2) from an open file descriptor, as int64.

    See the module's docstring for why this never reads through a memory map. A row costs one system
    call (a few microseconds; `benchmarks/loader_overhead.py` measures the whole loader against batches
    held in memory). A shard whose ids cannot be read in place is loaded whole, once, into memory.
    """

    def __init__(self, info: ShardInfo):
        self.info = info
        self._np_dtype = ID_DTYPES[info.dtype]
        self._fd: int | None = None
        self._whole: torch.Tensor | None = None
        try:
            if info.offset is None:
                self._whole = _load_unmapped(info.path)
                if not isinstance(self._whole, torch.Tensor) or tuple(self._whole.shape) != (info.rows, info.width):
                    raise UserError(f"data file {info.path} changed since training started; restore it.")
            else:
                self._fd = os.open(info.path, os.O_RDONLY)
        except OSError as e:
            raise UserError(
                f"data file {info.path} can no longer be read ({e.strerror}); restore it, then resume."
            ) from None

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) as a (count, width) int64 tensor."""
        info = self.info
        if self._whole is not None:
            return self._whole[start : start + count].long()
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
        buf = bytearray(want)
        try:
            got = os.preadv(self._fd, [buf], offset)
        except OSError as e:
            raise UserError(f"data file {self.info.path} could not be read at row {row} ({e.strerror}); "
                            "restore it, then resume.") from None
        if got < want:
            raise UserError(
                f"data file {self.info.path} became shorter while training (row {row} now lies past its end): "
                "it was truncated or rewritten during the run; restore it, then resume."
            )
        return torch.from_numpy(np.frombuffer(buf, dtype=self._np_dtype).astype(np.int64))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
    """Find every shard and check its header (fast: no token is read)."""
    return [check_header(p, load_shard(p), max_tokens) for p in find_shards(data_dir, flag)]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts, identical in every process (unlike Python's salted hash)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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

"""What every shard format gives the reader: a header (`ShardInfo`: rows, width, dtype, where row r's ids lie),
the interface a format implements (`ShardFormat`), and a remote object's header window (`HeaderWindow`).

A format only parses. Its header says where the rows lie in the file (a byte offset and a row stride), and
`ShardReader` (data/shards.py) reads those byte ranges itself: locally with pread(2), remotely a block of rows at a
time through a `BlockCache` (data/blocks.py). A shard whose ids cannot be read in place (the header's offset is
None) is loaded whole by its format instead. Which format a file is in is chosen by its suffix (formats/__init__.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from encoder_train.errors import UserError


class ObjectStore(Protocol):
    """What a format and the reader need of a bucket (data/store.py's RemoteStore): ranged reads and an open file.
    Named here rather than imported, because the store imports the formats (it lists the suffixes they claim)."""

    root: str

    def read(self, url: str, start: int, length: int, where: str = "") -> bytes: ...

    def open(self, url: str) -> Any: ...


HEADER_BYTES = 64 << 10  # a remote shard's header: its first and last 64 KB


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
    # Where the bytes are: None for a local file (read with pread), else the ObjectStore it was listed from.
    store: ObjectStore | None = field(default=None, compare=False, repr=False)


# Every integer dtype a shard may hold, as numpy reads it from the file's little-endian bytes.
ID_DTYPES = {
    torch.uint8: np.dtype("u1"),
    torch.int8: np.dtype("i1"),
    torch.int16: np.dtype("<i2"),
    torch.int32: np.dtype("<i4"),
    torch.int64: np.dtype("<i8"),
    **{getattr(torch, f"uint{b}"): np.dtype(f"<u{b // 8}") for b in (16, 32, 64) if hasattr(torch, f"uint{b}")},
}


class ShardFormat(Protocol):
    """One kind of shard file. The suffixes it claims are its keys in formats.FORMATS."""

    def header(self, path: str, max_tokens: int) -> ShardInfo:
        """A local file's header, checked (an integer dtype of ID_DTYPES, rows and width > 0, width <= max_tokens)
        without reading its ids; a UserError naming the file otherwise."""

    def remote_header(self, store: ObjectStore, url: str, size: int, max_tokens: int) -> ShardInfo:
        """The same for an object in `store` of `size` bytes, from ranged reads (a `HeaderWindow`); its offset
        must not be None: a remote shard is only read in place."""

    def load(self, path: str) -> torch.Tensor:
        """The whole (rows, width) tensor of a local shard whose header has no offset."""

    def fingerprint(self, info: ShardInfo) -> str:
        """What tells a changed shard from the one a checkpoint's position refers to, beside its path (one line of
        text, hashed into its source's fingerprint: data/mixture.py)."""


def check_width(path: str, width: int, max_tokens: int) -> None:
    """Refuse rows longer than the model's positions."""
    if width > max_tokens:
        raise UserError(
            f"data file {path} has rows of {width} tokens but the model's positions hold at most {max_tokens}; "
            f"re-tokenize with --seq_len {max_tokens} or raise model.max_position_embeddings."
        )


class HeaderWindow(io.RawIOBase):
    """A remote shard as a seekable file for a format's parser (zipfile, torch.load): its first and last
    HEADER_BYTES are fetched once (one request each, one for a small shard), any other byte range on demand."""

    def __init__(self, store: ObjectStore, url: str, size: int):
        self.store, self.url, self.size, self.pos = store, url, size, 0
        self.error: UserError | None = None  # a failed read inside a parser (torch.load's C++ reader would hide it)
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

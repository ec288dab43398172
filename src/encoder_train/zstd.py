"""Zstandard input, decompressed one block at a time, so that memory stays bounded whatever a file expands to.

A `.zst` file is a run of frames (`zstd` writes one, `pzstd` and `zstd -T` several, and skippable frames may sit
between them), each a header, blocks and an optional checksum (RFC 8878). A block regenerates at most 128 KB,
however few bytes it takes: 1.2 MB of run-length blocks expands to 12 GB. Given 64 KB of compressed input at a
time, as a stream reader reads it, one call of the decompressor could return gigabytes; given one block at a
time (its size is in its 3-byte header), each call returns at most `BLOCK_MAX` bytes.

Walking the block headers also tells a file cut inside a frame (a download that stopped) from a complete one,
which zstandard's own stream reader does not (it ends such a file silently, as if it were whole): that raises
EOFError here, a damaged frame OSError, which the text reader words for a person.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from types import ModuleType
from typing import Any

MAGIC = b"\x28\xb5\x2f\xfd"  # 0xFD2FB528, little-endian
SKIPPABLE = range(0x184D2A50, 0x184D2A60)  # user data zstd ignores: a 4-byte length, then that many bytes
BLOCK_MAX = 128 << 10  # the most one block regenerates (and the most it may take compressed)
SKIP_READ_BYTES = 1 << 20  # a skippable frame is read past this much at a time
CUT_SHORT = "the file ends inside a Zstandard frame: it was cut short"


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a `.zst` stream, frame after frame, for `io.BufferedReader` and lines on top.
    Memory: one block in and out (2 x 128 KB) and the frame's window, whatever the file's size or ratio."""

    def __init__(self, raw: io.BufferedReader, zstandard: ModuleType) -> None:
        super().__init__()
        self.raw, self.zstandard = raw, zstandard
        self.decompressor = zstandard.ZstdDecompressor()
        self.blocks = self._blocks()
        self.pending = memoryview(b"")  # decompressed bytes not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            block = next(self.blocks, None)
            if block is None:
                return 0
            self.pending = memoryview(block)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _blocks(self) -> Iterator[bytes]:
        """The output of each block of each frame, in order (some empty: a header, a checksum)."""
        while magic := self.raw.read(4):
            number = int.from_bytes(self._complete(magic, 4), "little")
            if number in SKIPPABLE:
                self._skip(int.from_bytes(self._exact(4), "little"))
            elif magic == MAGIC:
                yield from self._frame(magic)
            else:  # not a frame: in the library's own words ("Unknown frame descriptor"), as zstd -t says it
                self._feed(self.decompressor.decompressobj(), magic)
                raise OSError("this is not Zstandard data (a frame starts with an unknown magic number)")

    def _frame(self, magic: bytes) -> Iterator[bytes]:
        frame = self.decompressor.decompressobj()
        descriptor = self._exact(1)[0]
        single_segment, has_checksum = descriptor >> 5 & 1, descriptor >> 2 & 1
        window = 0 if single_segment else 1
        dictionary = (0, 1, 2, 4)[descriptor & 3]
        content_size = (single_segment, 2, 4, 8)[descriptor >> 6]
        yield self._feed(frame, magic + bytes([descriptor]) + self._exact(window + dictionary + content_size))
        last = False
        while not last:
            header = self._exact(3)
            value = int.from_bytes(header, "little")
            last, kind, size = bool(value & 1), value >> 1 & 3, value >> 3
            if kind == 3 or size > BLOCK_MAX:
                raise OSError("a Zstandard block header is invalid: the frame is damaged")
            yield self._feed(frame, header + self._exact(1 if kind == 1 else size))  # kind 1: one byte repeated
        if has_checksum:
            yield self._feed(frame, self._exact(4))
        if not frame.eof:
            raise OSError("a Zstandard frame did not end where its last block says: the frame is damaged")

    def _feed(self, frame: Any, data: bytes) -> bytes:
        try:
            return frame.decompress(data)
        except self.zstandard.ZstdError as e:
            raise OSError(str(e)) from None

    def _exact(self, n: int) -> bytes:
        return self._complete(self.raw.read(n), n)

    @staticmethod
    def _complete(data: bytes, n: int) -> bytes:
        if len(data) < n:
            raise EOFError(CUT_SHORT)
        return data

    def _skip(self, n: int) -> None:
        while n:
            n -= len(self._exact(min(n, SKIP_READ_BYTES)))

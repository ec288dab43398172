"""The `.pt` shard: one 2-D integer tensor `[rows, width]` of token ids, each row right-padded with the pad id,
saved with `torch.save` (what `encoder-train pretokenize` writes).

Its header (dtype, shape, where the ids lie in the file) is read once, through a memory map that no id is ever read
from: torch.save writes a zip archive whose one uncompressed data record holds the ids, so the record's offset in
the file and the tensor's strides say where row r lies, and `ShardReader` reads the rows from there. A file in the
legacy (pre-1.6) format, or whose ids are not laid out that way, is loaded whole instead (`PtFormat.load`).

Shards in object storage (an fsspec URL, data/store.py) are parsed from ranged reads instead: the first and last
64 KB of the object hold the zip's central directory, the tensor's pickled header and the local header of its one
data record, which gives where the ids lie; only a plain tensor whose ids can be read in place is accepted.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from encoder_train.data.formats.base import ID_DTYPES, HeaderWindow, ObjectStore, ShardInfo, check_width
from encoder_train.errors import UserError


class PtFormat:
    """`.pt` files: a tensor saved by torch.save."""

    def header(self, path: str, max_tokens: int) -> ShardInfo:
        return check_header(path, load_shard(path), max_tokens)

    def remote_header(self, store: ObjectStore, url: str, size: int, max_tokens: int) -> ShardInfo:
        return remote_header(store, url, size, max_tokens)

    def load(self, path: str) -> torch.Tensor:
        return _load_unmapped(path)

    def fingerprint(self, info: ShardInfo) -> str:
        # Rows and width, as source fingerprints have always hashed them (checkpoints of earlier runs resume).
        return f"{info.rows}\t{info.width}"


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
                 store: ObjectStore | None = None) -> ShardInfo:
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
    check_width(str(path), width, max_tokens)
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
    open file (a remote shard's `HeaderWindow`)."""
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


def remote_header(store: ObjectStore, url: str, size: int, max_tokens: int) -> ShardInfo:
    """check_header for a shard in object storage, from its first and last bytes (no id is read)."""
    f = HeaderWindow(store, url, size)
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

"""Finding, validating and ordering `.pt` shards.

A shard is one 2-D integer tensor `[rows, width]` of token ids, each row right-padded with the pad id,
saved with `torch.save`. Shards are memory-mapped (`torch.load(mmap=True)`), so a dataset larger than
RAM streams through the page cache and memory stays bounded.

The order of rows is a pure function of (seed, shard list, position), which is what makes resume
exact and instant: the data position in a checkpoint is one integer, the number of batches consumed.
Epoch e shuffles the file order, groups consecutive files into windows of `shuffle_files`, and
shuffles the rows within each window. The rows of all epochs form one endless stream; batch i is
rows [i*B, (i+1)*B) of it, wherever that falls.
"""

from __future__ import annotations

import bisect
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder_train.errors import UserError


@dataclass(frozen=True)
class ShardInfo:
    path: str
    rows: int
    width: int


def find_shards(data_dir: str | Path | None) -> list[Path]:
    """Every `*.pt` file under `data_dir`, in subfolders too, in a stable (sorted) order."""
    if data_dir is None:
        raise UserError("no training data given; pass --data_dir with a folder of .pt shards.")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass --data_dir with a folder of .pt shards.")
    paths = sorted(p for p in root.rglob("*.pt") if p.is_file())
    if not paths:
        raise UserError(
            f"data folder {root} holds no .pt files (searched subfolders too); "
            "write shards with `encoder-train pretokenize` or point --data_dir elsewhere."
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
    """Checks that need no data read: dtype, rank, width, emptiness."""
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise UserError(
            f"data file {path} holds a {str(t.dtype).removeprefix('torch.')} tensor; token ids must be an "
            "integer tensor (int64, int32 or int16)."
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
    return ShardInfo(str(path), rows, width)


def check_values(path: str | Path, t: torch.Tensor, vocab_size: int) -> None:
    """Every id in [0, vocab_size). Reads the whole shard once."""
    lo, hi = int(t.min()), int(t.max())
    if lo < 0:
        raise UserError(f"data file {path} holds the negative token id {lo}; token ids must be >= 0.")
    if hi >= vocab_size:
        raise UserError(
            f"data file {path} holds token id {hi}, outside the tokenizer's vocabulary of {vocab_size}; "
            "pre-tokenize the data with the same tokenizer you pass to --tokenizer_filepath."
        )


def scan_shards(data_dir: str | Path | None, max_tokens: int) -> list[ShardInfo]:
    """Find every shard and check its header (fast: memory-mapped, no token is read)."""
    return [check_header(p, load_shard(p), max_tokens) for p in find_shards(data_dir)]


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

"""Text -> packed `.pt` shards, once, before training.

The stages, in the order the data flows:

    files -> documents (`iter_texts`, streamed)
          -> token ids (`encode_batch`: Rust, one thread per core, on a background Python thread)
          -> one token stream, `</s>` between documents
          -> rows `<s> + seq_len-2 tokens + </s>` (RoBERTa's FULL-SENTENCES packing)
          -> train / val shards of `rows_per_shard` rows

A document that crosses a row boundary continues in the next row, so no slot is wasted: only the very
last row is right-padded with `<pad>`. Each shard is one plain `torch.int32` tensor of shape
`(rows, seq_len)`, saved with `torch.save`, so `torch.load(path, weights_only=True, mmap=True)` reads it
without copying. The output depends only on the inputs, the tokenizer and the arguments that change
results (`seq_len`, `rows_per_shard`, `val_fraction`): the same run twice gives byte-identical files.
"""

from __future__ import annotations

import io
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from encoder_train.errors import UserError
from encoder_train.textfiles import Input, RemoteInput, check_inputs, input_bytes, iter_texts
from encoder_train.tokenizer import load_tokenizer, special_tokens

# Shortest row worth training on: <s>, </s> and a handful of tokens.
MIN_SEQ_LEN = 8

# The largest shard: one is held in memory while it fills (the default, 8192 rows of 512 int32 ids, is 16 MiB).
MAX_SHARD_BYTES = 1 << 32

# Characters of text per `encode_batch` call. Large enough that every core gets many documents,
# small enough that the two batches in flight stay a few MB. Changes speed only, never the output.
ENCODE_BATCH_CHARS = 1 << 22

# The folders under --output_dir that the training and the held-out rows go to, unless named otherwise.
SPLITS = ("train", "val")

# A new shard's name suffix until every shard of the run is written: the trainer reads `*.pt` only, so
# neither a run that fails nor one killed midway mixes new rows with the old dataset.
STAGED = ".new"


@dataclass(frozen=True)
class PretokenizeReport:
    """What `pretokenize` read and wrote."""

    output_dir: Path | str  # a URL (str) where tasks wrote to object storage (data/tasks.py)
    train_dir: Path | str
    val_dir: Path | str
    seq_len: int
    documents: int
    tokens: int
    """Document tokens, not counting the `<s>`/`</s>` around rows and the `</s>` between documents."""
    rows: int
    train_rows: int
    val_rows: int
    train_shards: int
    val_shards: int
    fill_ratio: float
    """Non-padding slots / all slots (rows * seq_len)."""
    input_bytes: int
    """Bytes read from disk (compressed bytes for .gz)."""
    output_bytes: int
    seconds: float

    @property
    def shards(self) -> int:
        """Train and val shards together."""
        return self.train_shards + self.val_shards

    @property
    def megabytes_per_second(self) -> float:
        """Input throughput, in MB (10^6 bytes) per second."""
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def pretokenize(
    inputs: Sequence[str | Path | RemoteInput],
    tokenizer_path: str | Path,
    output_dir: str | Path,
    seq_len: int,
    rows_per_shard: int = 8192,
    val_fraction: float = 0.01,
    overwrite: bool = False,
    max_positions: int | None = None,
    progress: bool = True,
    batch_chars: int = ENCODE_BATCH_CHARS,
    text_field: str = "text",
    folders: tuple[str, str] = SPLITS,
) -> PretokenizeReport:
    """Tokenize the files `iter_texts` reads (text, .jsonl, Parquet, .gz and .zst) into packed `(rows, seq_len)`
    int32 shards in `output_dir`/{train,val}, or in the two folders `folders` names under `output_dir` (a recipe's
    source: `--output_dir shards` with folders (web, web-val) for `data_dir: shards/web, val_data_dir: shards/web-val`).

    Every `1/val_fraction`-th row goes to val (rows are assigned by index, so train and val are
    disjoint and the split is the same on every run). `max_positions`, when given, is the largest
    `seq_len` the model accepts. `text_field` names the .jsonl field and the Parquet column that hold
    the text. All CPU cores are used; to use fewer, set RAYON_NUM_THREADS.

    With `overwrite`, the shards already in `output_dir` stay until every new shard is written (the new
    ones wait as `shard_XXXXX.pt.new`, a name the trainer does not read), so a bad line in the last file,
    a truncated download or Ctrl-C leaves the earlier dataset as it was. A failed run also removes the folders it
    created (never one that was there before), and a run that held out no rows leaves no empty val folder.
    """
    check_arguments(seq_len, rows_per_shard, val_fraction, max_positions, batch_chars)
    tokenizer = load_tokenizer(tokenizer_path)
    ids = special_tokens(tokenizer, tokenizer_path)
    # Text that happens to spell "<s>" or "<mask>" (an HTML <s> tag, a tutorial on tokenizers) is
    # tokenized as text: only the packer below places special tokens.
    tokenizer.encode_special_tokens = True
    inputs: list[Input] = [Path(p) if isinstance(p, (str, Path)) else p for p in inputs]
    check_inputs(inputs)
    output_dir = Path(output_dir)
    train_dir, val_dir = split_folders(output_dir, folders)
    old_shards = _existing_shards(output_dir, (train_dir, val_dir), overwrite)

    start = time.perf_counter()
    total_bytes = input_bytes(inputs)
    bytes_read = 0

    def count_bytes(n: int) -> None:
        nonlocal bytes_read
        bytes_read += n

    documents = iter_texts(inputs, progress=count_bytes, text_field=text_field)
    first = next(documents)  # raises the "no text" error, and a Parquet file's missing column, before any writing
    created = _make_folders((train_dir, val_dir))  # the folders this run made, parents first: a failure removes them
    splits = _Splits(train_dir, val_dir, rows_per_shard, seq_len, val_fraction)
    packer = RowPacker(seq_len, bos=ids.bos, eos=ids.eos, pad=ids.pad)
    n_documents = n_tokens = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="pretokenize", disable=not progress)
    try:
        for texts, stream in encoded_batches(tokenizer, _batches(first, documents, batch_chars), ids.eos):
            n_tokens += len(stream) - len(texts)  # every document comes with one separator
            if n_documents == 0:
                stream = stream[1:]  # the stream starts with a document, not a separator
            n_documents += len(texts)
            splits.add(packer.rows(stream))
            bar.update(bytes_read - bar.n)
        splits.add(packer.last_row())
        splits.close()
    except BaseException:
        splits.remove_written()  # the new shards; the old ones were never touched
        _remove_empty(created)
        raise
    finally:
        bar.close()
    splits.commit(old_shards)
    _remove_empty([val_dir] if val_dir in created else [])  # nothing held out: no empty folder to point at

    slots = splits.rows * seq_len
    return PretokenizeReport(
        output_dir=output_dir,
        train_dir=train_dir,
        val_dir=val_dir,
        seq_len=seq_len,
        documents=n_documents,
        tokens=n_tokens,
        rows=splits.rows,
        train_rows=splits.train.rows,
        val_rows=splits.val.rows,
        train_shards=len(splits.train.written),
        val_shards=len(splits.val.written),
        fill_ratio=(slots - packer.padding) / slots,
        input_bytes=total_bytes,
        output_bytes=splits.train.bytes + splits.val.bytes,
        seconds=time.perf_counter() - start,
    )


def check_arguments(
    seq_len: int, rows_per_shard: int, val_fraction: float, max_positions: int | None, batch_chars: int
) -> None:
    """Raise a UserError naming the first argument that cannot work."""
    if seq_len < MIN_SEQ_LEN:
        raise UserError(f"seq_len {seq_len} is too short; pass --seq_len {MIN_SEQ_LEN} or more (e.g. 128 or 512).")
    if max_positions is not None and seq_len > max_positions:
        raise UserError(
            f"seq_len {seq_len} is longer than the model's max_positions {max_positions}; "
            f"pass --seq_len {max_positions} or less."
        )
    if rows_per_shard < 1:
        raise UserError(f"rows_per_shard {rows_per_shard} must be at least 1; pass e.g. --rows_per_shard 8192.")
    if rows_per_shard * seq_len * 4 > MAX_SHARD_BYTES:
        fits = max(1, MAX_SHARD_BYTES // (seq_len * 4))
        raise UserError(
            f"--rows_per_shard {rows_per_shard} rows of --seq_len {seq_len} tokens make shards of "
            f"{rows_per_shard * seq_len * 4 / 2**30:,.1f} GiB, and each is held in memory while it fills; the "
            f"limit is {MAX_SHARD_BYTES >> 30} GiB: "
            + (f"pass --rows_per_shard {fits} or less." if fits * seq_len * 4 <= MAX_SHARD_BYTES
               else f"pass --seq_len {MAX_SHARD_BYTES // 4} or less (the model's positions are far fewer).")
        )
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction} must be in [0, 1); pass e.g. --val_fraction 0.01.")
    if batch_chars < 1:
        raise UserError(f"batch_chars {batch_chars} must be at least 1.")


def split_folders(output_dir: Path, folders: tuple[str, str]) -> tuple[Path, Path]:
    """The training and the held-out folders: two different names of single folders under `output_dir`."""
    train, val = folders
    for name in folders:
        if not name or Path(name).name != name or name in (".", ".."):
            raise UserError(f"folder name {name!r} is not one folder's name; pass a plain name such as web or "
                            "web-val (the folder is made under --output_dir).")
    if train == val:
        raise UserError(f"the training and the held-out rows would share the folder {train}; give them two names.")
    return output_dir / train, output_dir / val


def _existing_shards(output_dir: Path, split_dirs: tuple[Path, Path], overwrite: bool) -> list[Path]:
    """The `.pt` shards (and leftover `.pt.tmp`, `.pt.new`) already in the split folders; refuses unless
    `overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file; pass a folder path as --output_dir.")
    old = sorted(
        path
        for folder in split_dirs
        if folder.is_dir()
        for pattern in ("*.pt", "*.pt.tmp", "*.pt" + STAGED)
        for path in folder.glob(pattern)
    )
    shards = [p for p in old if p.suffix == ".pt"]
    if shards and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds {len(shards)} .pt shard{'s' if len(shards) != 1 else ''} "
            f"(e.g. {shards[0]}); pass --overwrite to replace {'them' if len(shards) != 1 else 'it'}, or choose "
            "another --output_dir."
        )
    return old


def _batches(first: str, documents: Iterator[str], batch_chars: int) -> Iterator[list[str]]:
    """Group documents into lists of about `batch_chars` characters (at least one document each)."""
    batch, chars = [first], len(first)
    for text in documents:
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
        batch.append(text)
        chars += len(text)
    yield batch


def encoded_batches(
    tokenizer: Tokenizer, batches: Iterator[list[str]], eos: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (texts, `</s> doc1 </s> doc2 ...` as int32 ids) per batch, in order.

    Encoding runs on a background thread (the Rust side releases the GIL and uses every core) while
    this thread reads the next batch and packs and writes the previous one. At most two batches are
    in flight, which bounds memory whatever the input size.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
        pending: deque[tuple[list[str], Future[np.ndarray]]] = deque()
        for texts in batches:
            pending.append((texts, encoder.submit(_encode, tokenizer, texts, eos)))
            if len(pending) == 2:
                texts, future = pending.popleft()
                yield texts, future.result()
        while pending:
            texts, future = pending.popleft()
            yield texts, future.result()


def _encode(tokenizer: Tokenizer, texts: list[str], eos: int) -> np.ndarray:
    """Token ids of `texts` without the post-processor's <s>/</s>, each preceded by `eos`: (n,) int32."""
    # encode_batch_fast skips the character offsets that packing never uses (tokenizers >= 0.20).
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    # One small array per document, joined once: twice as fast as one Python list of every id (this runs on the
    # encoding thread, between two encode_batch calls, so its time adds to the tokenizer's).
    separator = np.array([eos], dtype=np.int32)
    parts: list[np.ndarray] = []
    for encoding in encode_batch(texts, add_special_tokens=False):
        parts += (separator, np.array(encoding.ids, dtype=np.int32))
    return np.concatenate(parts)


class RowPacker:
    """Cuts a token stream into rows `<s> + seq_len-2 tokens + </s>`, keeping the unfinished tail."""

    def __init__(self, seq_len: int, bos: int, eos: int, pad: int) -> None:
        self.seq_len, self.bos, self.eos, self.pad = seq_len, bos, eos, pad
        self.tail = np.empty(0, dtype=np.int32)  # (< seq_len-2,) tokens waiting for the next batch
        self.padding = 0  # <pad> slots written (all in the last row)

    def rows(self, stream: np.ndarray) -> np.ndarray:
        """Every full row that `stream` (appended to the tail) completes: (n, seq_len) int32."""
        stream = np.concatenate([self.tail, stream])
        width = self.seq_len - 2
        n = len(stream) // width
        self.tail = stream[n * width :].copy()
        return self._wrap(stream[: n * width].reshape(n, width))

    def last_row(self) -> np.ndarray:
        """The tail as one right-padded row `<s> tokens </s> <pad>...`: (1, seq_len), or (0, seq_len)."""
        n = len(self.tail)
        if n == 0:
            return np.empty((0, self.seq_len), dtype=np.int32)
        row = np.full((1, self.seq_len), self.pad, dtype=np.int32)
        row[0, 0], row[0, 1 : n + 1], row[0, n + 1] = self.bos, self.tail, self.eos
        self.padding = self.seq_len - n - 2
        self.tail = self.tail[:0]
        return row

    def _wrap(self, body: np.ndarray) -> np.ndarray:
        """(n, seq_len-2) -> (n, seq_len) with <s> in front and </s> at the end."""
        rows = np.empty((len(body), self.seq_len), dtype=np.int32)
        rows[:, 0] = self.bos
        rows[:, 1:-1] = body
        rows[:, -1] = self.eos
        return rows


class _Splits:
    """Sends each row to the train or the val shards, by its index in the whole dataset."""

    def __init__(self, train_dir: Path, val_dir: Path, rows_per_shard: int, seq_len: int, val_fraction: float) -> None:
        self.train = _ShardWriter(train_dir, rows_per_shard, seq_len)
        self.val = _ShardWriter(val_dir, rows_per_shard, seq_len)
        self.val_fraction = val_fraction
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        """Route (n, seq_len) rows: row i is val when floor((i+1)f) > floor(i f), i.e. every 1/f-th row."""
        index = np.arange(self.rows, self.rows + len(rows), dtype=np.float64)  # exact below 2^53 rows
        is_val = np.floor((index + 1) * self.val_fraction) > np.floor(index * self.val_fraction)
        self.train.add(rows[~is_val])
        self.val.add(rows[is_val])
        self.rows += len(rows)

    def close(self) -> None:
        """Write the last, shorter shard of each split."""
        self.train.close()
        self.val.close()

    def remove_written(self) -> None:
        """Delete the shards written so far (after a failure)."""
        self.train.remove_written()
        self.val.remove_written()

    def commit(self, old: list[Path]) -> None:
        """Give the new shards their `.pt` names, then delete the old files they did not replace."""
        new = self.train.commit() + self.val.commit()
        keep = set(new)
        for path in old:
            if path not in keep:
                path.unlink(missing_ok=True)


class _ShardWriter:
    """Collects rows of one split and writes them as `shard_00000.pt`, ... of `rows_per_shard` rows."""

    def __init__(self, folder: Path, rows_per_shard: int, seq_len: int) -> None:
        self.folder = folder  # made by _make_folders
        self.buffer = np.empty((rows_per_shard, seq_len), dtype=np.int32)  # the one shard held in memory
        self.filled = 0
        self.rows = 0
        self.bytes = 0
        self.written: list[Path] = []

    def add(self, rows: np.ndarray) -> None:
        """Append (n, seq_len) rows, writing a shard each time the buffer fills."""
        while len(rows):
            take = min(len(rows), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            self.rows += take
            rows = rows[take:]
            if self.filled == len(self.buffer):
                self._write()

    def close(self) -> None:
        """Write the last, shorter shard."""
        if self.filled:
            self._write()

    def remove_written(self) -> None:
        """Delete the shards written so far (after a failure)."""
        for path in self.written:
            _staged(path).unlink(missing_ok=True)

    def commit(self) -> list[Path]:
        """Rename each written `shard_XXXXX.pt.new` to `shard_XXXXX.pt`, replacing an old shard of that name."""
        for path in self.written:
            try:
                os.replace(_staged(path), path)
            except OSError as e:
                raise UserError(
                    f"could not rename {_staged(path)} to {path} ({e.strerror}); rename the .pt.new files in "
                    f"{self.folder} to .pt by hand, or run pretokenize again."
                ) from None
        return self.written

    def _write(self) -> None:
        """Save the filled part of the buffer as the next shard, under its staged name until `commit`."""
        # clone(): a slice of the buffer would save the whole buffer's storage, not just these rows.
        tensor = torch.from_numpy(self.buffer[: self.filled]).clone().contiguous()
        data = io.BytesIO()  # saved in memory so the archive name inside the file does not depend on its name
        torch.save(tensor, data)
        path = self.folder / f"shard_{len(self.written):05d}.pt"
        staged = _staged(path)
        try:
            staged.write_bytes(data.getbuffer())
        except OSError as e:  # a full disk, a read-only folder
            staged.unlink(missing_ok=True)
            raise UserError(
                f"could not write {path} ({e.strerror}); free space or pass another --output_dir."
            ) from None
        self.written.append(path)
        self.bytes += len(data.getbuffer())
        self.filled = 0


def _make_folders(folders: Sequence[Path]) -> list[Path]:
    """`mkdir -p` each folder; returns the folders made (parents first), or removes them again and raises."""
    created: list[Path] = []
    for folder in folders:
        try:
            for path in [p for p in (folder, *folder.parents) if not p.exists()][::-1]:
                path.mkdir()
                created.append(path)
            folder.mkdir(exist_ok=True)  # there already: a folder passes, a file of that name is refused
        except OSError as e:
            _remove_empty(created)
            raise UserError(f"could not create {folder} ({e.strerror}); pass a writable --output_dir.") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (made by this run) that are empty, deepest first; a folder that holds anything
    (a file someone put there meanwhile) stays."""
    for path in reversed(folders):
        try:
            path.rmdir()
        except OSError:
            pass


def _staged(path: Path) -> Path:
    """`shard_00000.pt` -> `shard_00000.pt.new`."""
    return path.with_name(path.name + STAGED)

"""Text files as documents: plain text, .jsonl and Parquet, and .gz and .zst compressed text and .jsonl.

Read by tokenizer training (tokenizer.py) and by `pretokenize` (data/prepare.py); it imports neither, so both sit
above it. Every file is streamed (a line, or a batch of Parquet rows, at a time) and every read is bounded: a
document by MAX_DOCUMENT_CHARS, a line by MAX_LINE_CHARS, a .zst block by zstd.py. A file that cannot be read as
its name says stops the run with one sentence naming it (and the line or row).

An input may also be an object in a bucket (`RemoteInput`, listed from URLs and globs by data/inputs.py): it is
streamed through its fsspec file object under the same bounded readers as a local file, so a 12 GB line in a small
remote .zst is never held whole either.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from encoder_train.errors import UserError, require
from encoder_train.urls import is_remote, local_path
from encoder_train.zstd import ZstdReader

# A paragraph longer than this is cut at a line boundary into several documents, so that one file
# without blank lines never has to fit in memory at once.
MAX_DOCUMENT_CHARS = 1 << 20

# A line longer than this (characters, without its line ending) stops the run, naming it: every line is held
# whole once (a .jsonl object is parsed whole), so this bounds what one read holds, where a 1.2 MB .zst of one
# 12 GB line would otherwise be read until memory runs out. No document needs it: a 64 M-character book is
# 30,000 pages, and plain text may break such a document into lines.
MAX_LINE_CHARS = 1 << 26

# Progress is reported every this many lines: asking the file for its position costs a system call.
PROGRESS_EVERY_LINES = 256

class RemoteInput(Protocol):
    """An input file in object storage, listed by data/inputs.py's `expand_inputs`: its name, its size as listed,
    and `open()`, the object as a read-only binary file of ranged reads. Named here rather than imported: data/
    imports this module."""

    size: int

    @property
    def name(self) -> str: ...

    def open(self) -> Any: ...


Input = Path | RemoteInput


def _as_input(path: str | Path | RemoteInput) -> Input:
    if isinstance(path, (str, Path)):
        if is_remote(str(path)):
            raise UserError(f"input {path} is a URL; list it with data.inputs.expand_inputs first.")
        return Path(local_path(str(path)))
    return path


def iter_texts(paths: Iterable[str | Path | RemoteInput], progress: Callable[[int], None] | None = None,
               text_field: str = "text") -> Iterator[str]:
    """Yield the documents of text, .jsonl and Parquet files (.gz and .zst compressed text and .jsonl too).

    Files are streamed: a line, or a batch of PARQUET_BATCH_ROWS rows, at a time. A path ending in
    `.jsonl`, `.jsonl.gz` or `.jsonl.zst` holds one JSON object per line, whose `text_field` is the
    document; a `.parquet` file's documents are its `text_field` column (null values are skipped,
    as empty ones are); any other path is UTF-8 text whose documents are separated by blank lines.
    Blank documents are skipped. `progress(n)` is called with the number of bytes read from disk
    (compressed bytes for .gz and .zst; for Parquet, the file's size in proportion to the rows read),
    for a progress bar.
    """
    paths = [_as_input(p) for p in paths]
    check_inputs(paths)  # all of them, before spending time on the first
    check_formats(paths, text_field)
    found = False
    for path in paths:
        for text in _documents(path, progress, text_field):
            found = True
            yield from pieces(text)
    if not found:
        names = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise UserError(
            f"the input {names} holds no text; pass files with at least one non-blank line "
            f'(plain text) or one non-empty "{text_field}" field (.jsonl) or value (.parquet).'
        )


def file_texts(path: Input, progress: Callable[[int], None] | None = None, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, as `iter_texts` reads them (a file without text yields none)."""
    for text in _documents(path, progress, text_field):
        yield from pieces(text)


def pieces(text: str, limit: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """`text` cut into documents of at most `limit` characters, each cut just before a space that follows a
    non-space: the tokenizers' pre-tokenizers split there anyway (the space starts the next word's token), so the
    tokens are those of the whole text. A run of `limit` characters with no such space (a base64 blob) is cut
    where it reaches the limit. One line of 20 MB otherwise goes to the tokenizer whole, which holds ~150 bytes
    per character while it works (3.4 GB, where 1 MB pieces keep the usual few hundred MB)."""
    start = 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + limit // 2, start + limit)
        while cut > start and text[cut - 1].isspace():  # inside a run of spaces: cut before the run
            cut = text.rfind(" ", start + limit // 2, cut)
        cut = cut if cut > start else start + limit
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def check_inputs(paths: Sequence[Input]) -> None:
    """Raise a UserError unless every path is a readable file and there is at least one (a remote input was listed
    as an object by `expand_inputs`)."""
    if not paths:
        raise UserError("no input files were given; pass at least one text or .jsonl file with --input.")
    for path in paths:
        if not isinstance(path, Path):
            continue
        if path.is_dir():
            raise UserError(f"input {path} is a folder; pass the text files inside it (e.g. {path}/*.txt).")
        if path.exists() and not path.is_file():  # a pipe (`<(zcat x.gz)`), a device: read once, never again
            raise UserError(f"input {path} is not a regular file (a pipe or a device); save the text to a file "
                            "and pass that to --input (.gz and .zst files are read as they are).")
        if not path.is_file():
            raise UserError(f"input file {path} does not exist; check the path passed to --input.")
        if not os.access(path, os.R_OK):
            raise UserError(f"input file {path} cannot be read (permission denied); fix its permissions.")


def check_formats(paths: Sequence[Input], text_field: str = "text") -> None:
    """Raise a UserError for what can be told before reading any document: a missing optional package
    (pyarrow, zstandard), and a Parquet file without a `text_field` column of text (its footer alone says),
    so that the fifth file of a long run does not stop it after hours on the first four."""
    if not text_field:
        raise UserError("--text_field is empty; pass the name of the field (.jsonl) or column (.parquet) that "
                        "holds the text, e.g. --text_field text.")
    for path in paths:
        if _is_zstd(path):
            _zstandard(path)
        elif _is_parquet(path):
            with _open_parquet(path) as parquet:
                _check_text_column(parquet, path, text_field)


def _documents(path: Input, progress: Callable[[int], None] | None, text_field: str) -> Iterator[str]:
    """The documents of one file, read as its name says (see `iter_texts`)."""
    if _is_parquet(path):
        return _parquet_documents(path, progress, text_field)
    if _is_jsonl(path):
        return _jsonl_documents(path, progress, text_field)
    return _paragraph_documents(path, progress)


def _is_jsonl(path: Input) -> bool:
    """True for `x.jsonl`, `x.jsonl.gz` and `x.jsonl.zst`."""
    name = path.name.lower()
    return name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))


def _is_parquet(path: Input) -> bool:
    """True for `x.parquet`."""
    return path.name.lower().endswith(".parquet")


def _paragraph_documents(path: Input, progress: Callable[[int], None] | None) -> Iterator[str]:
    """Documents of a plain-text file: runs of non-blank lines, joined with newlines."""
    lines: list[str] = []
    chars = 0
    for _, line in _numbered_lines(path, progress):
        if not line.strip():  # a blank (or whitespace-only) line ends the document
            if lines:
                yield "\n".join(lines)
            lines, chars = [], 0
            continue
        if chars + len(line) > MAX_DOCUMENT_CHARS and lines:
            yield "\n".join(lines)
            lines, chars = [], 0
        lines.append(line)
        chars += len(line) + 1
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(path: Input, progress: Callable[[int], None] | None, field: str = "text") -> Iterator[str]:
    """Documents of a .jsonl file: the `field` ("text" unless --text_field says) of each line's JSON object."""
    example = json.dumps({field: "..."}, ensure_ascii=False)
    for number, line in _numbered_lines(path, progress):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {number} is not valid JSON ({e.msg}); each line of a .jsonl file must be "
                f"one JSON object with a {json.dumps(field)} field."
            ) from None
        except RecursionError:
            raise UserError(
                f"{path} line {number} nests JSON arrays or objects too deeply to read; each line of a .jsonl "
                f"file must be one JSON object like {example}."
            ) from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(
                f"{path} line {number} has no {json.dumps(field)} string field; each line of a .jsonl file must "
                f"be one JSON object like {example}{_fields_hint(record, field)}."
            )
        if (lone := _SURROGATE.search(text)) is not None:
            raise UserError(
                f"{path} line {number} has the escape \\u{ord(lone.group()):04x}, half of a UTF-16 pair, which is "
                "no character and cannot be tokenized; repair or remove that line (e.g. re-encode the text from "
                "its source)."
            )
        if text.strip():
            yield text


def _fields_hint(record: object, field: str) -> str:
    """` (this line has "id", "body": pass --text_field to read one of them)` where the field is missing
    from an object that has others: a corpus whose text is in "content" or "body" is the usual case."""
    if not isinstance(record, dict) or field in record or not record:
        return ""
    names = ", ".join(json.dumps(name, ensure_ascii=False) for name in list(record)[:10])
    return f" (this line has {names}{', ...' if len(record) > 10 else ''}: pass --text_field to read one of them)"


# JSON's \ud800-\udfff escapes decode to lone surrogates: no UTF-8 encoding exists, and the Rust side refuses them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _numbered_lines(path: Input, progress: Callable[[int], None] | None) -> Iterator[tuple[int, str]]:
    """Yield (line number from 1, line without its line ending) of a UTF-8 file, decompressing `.gz` and `.zst`."""
    raw = _open_raw(path)
    with raw:
        # utf-8-sig drops a leading byte-order mark; newline=None ends lines at \n, \r\n and \r.
        text = io.TextIOWrapper(_decompressed(path, raw), encoding="utf-8-sig", newline=None)
        number = reported = 0
        try:
            for number, line in enumerate(_bounded_lines(text), start=1):
                line = line.removesuffix("\n")
                if len(line) > MAX_LINE_CHARS:
                    raise UserError(
                        f"{path} line {number} is longer than {MAX_LINE_CHARS:,} characters (the most one line may "
                        "hold); break it into lines, or split its document into several."
                    )
                yield number, line
                if progress is not None and number % PROGRESS_EVERY_LINES == 0:
                    progress(raw.tell() - reported)  # bytes on disk: compressed ones for .gz and .zst
                    reported = raw.tell()
        except UnicodeDecodeError:
            raise UserError(
                f"{path} line {_first_non_utf8_line(path)} is not UTF-8 text; convert the file to UTF-8 "
                "(e.g. with iconv)."
            ) from None
        except FileNotFoundError:  # a remote object deleted while it is read
            where = f"past line {number}" if number else "before its first line"
            raise UserError(f"input file {path} vanished while it was read ({where}); restore it and run "
                            "again.") from None
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a truncated .gz or .zst an EOFError
            where = f"past line {number}" if number else "at all"
            check = ("check that the file is complete and valid Zstandard (`zstd -t` tests it)" if _is_zstd(path)
                     else "check that the file is complete (and valid gzip if it ends in .gz)")
            raise UserError(f"input file {path} could not be read {where} ({e}); {check}.") from None
        if progress is not None:
            progress(raw.tell() - reported)


def _open_raw(path: Input) -> Any:
    """The file's bytes, opened for reading: a local file, or a remote object's ranged reads."""
    try:
        if not isinstance(path, Path):
            return path.open()
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as e:
        raise UserError(
            f"input file {path} cannot be read ({e.strerror}); check the path and its permissions."
        ) from None


def _size(path: Input) -> int:
    """The file's size in bytes (a remote one's as listed)."""
    return path.stat().st_size if isinstance(path, Path) else path.size


def input_bytes(paths: Sequence[Input]) -> int:
    """The inputs' bytes together, as stored (compressed for .gz and .zst)."""
    return sum(_size(p) for p in paths)


def _bounded_lines(text: io.TextIOWrapper) -> Iterator[str]:
    """Lines of `text`, each read up to MAX_LINE_CHARS + 1 characters: a longer line is returned cut there (the
    caller refuses it) instead of being gathered whole."""
    while line := text.readline(MAX_LINE_CHARS + 1):
        yield line
        if len(line.removesuffix("\n")) > MAX_LINE_CHARS:
            return


def _decompressed(path: Input, raw: io.BufferedReader) -> io.BufferedIOBase:
    """The bytes of `raw`, gunzipped for `*.gz` and decompressed for `*.zst`, as they are read."""
    if _is_gzip(path):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if _is_zstd(path):
        return io.BufferedReader(ZstdReader(raw, _zstandard(path)))
    return raw


def _first_non_utf8_line(path: Input) -> int:
    """Number of the first line that is not valid UTF-8 (slow; only used to word an error)."""
    number = 0
    with _open_raw(path) as raw:
        try:
            lines = _decompressed(path, raw)
            # Bounded like the text's lines: at most 4 bytes a character, a longer line is read in pieces.
            for number, line in enumerate(iter(lambda: lines.readline(4 * MAX_LINE_CHARS + 1), b""), start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return number
        except (OSError, EOFError):  # damaged after the bad text: the text is the error to report
            return number + 1
    return 0  # the file decodes line by line; the error was elsewhere


def _is_gzip(path: Input) -> bool:
    """True for `*.gz`."""
    return path.name.lower().endswith(".gz")


def _is_zstd(path: Input) -> bool:
    """True for `*.zst` (Zstandard, as `zstd` writes it)."""
    return path.name.lower().endswith(".zst")


def _zstandard(path: Input) -> ModuleType:
    """The zstandard package, or a UserError naming the extra that installs it."""
    return require("zstandard", "zstd", f"the Zstandard input {path}")


# Rows of a Parquet column converted to Python strings at a time: a batch of documents in memory, whatever the
# file's size (the other columns are never read).
PARQUET_BATCH_ROWS = 256

# Parquet bytes read from disk at a time. pyarrow's default (pre_buffer) instead reads a row group's whole column
# chunk first: 143 MB held for a 120 MB row group of text, where reading 1 MB at a time holds 24 MB, the same for
# a 40 MB row group (measured with pyarrow 26's memory pool, 256-row batches of 10 kB documents).
PARQUET_READ_BYTES = 1 << 20


def _open_parquet(path: Input) -> Any:
    """The `pyarrow.parquet.ParquetFile` at `path`, its footer read, or a UserError (not Parquet, cut short,
    unreadable). Typed Any: pyarrow is an optional extra, imported only here."""
    pq = require("pyarrow.parquet", "parquet", f"the Parquet input {path}")
    source = path if isinstance(path, Path) else _open_raw(path)
    try:
        return pq.ParquetFile(source, buffer_size=PARQUET_READ_BYTES, pre_buffer=False)
    except FileNotFoundError:
        raise UserError(f"input file {path} vanished while it was read; restore it and run again.") from None
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise UserError(
            f"Parquet file {path} could not be read ({_one_line(e)}); check that the file is complete and is Parquet "
            "(a file ending in .parquet is read as Parquet)."
        ) from None


def _check_text_column(parquet: Any, path: Input, field: str) -> None:
    """Raise a UserError unless the file has a column `field` of strings."""
    import pyarrow as pa  # present: _open_parquet imported pyarrow.parquet

    schema = parquet.schema_arrow
    if field not in schema.names:
        names = ", ".join(json.dumps(n, ensure_ascii=False) for n in schema.names[:20])
        more = ", ..." if len(schema.names) > 20 else ""
        raise UserError(
            f"Parquet file {path} has no column {json.dumps(field)} (its columns: {names or 'none'}{more}); pass "
            "--text_field with the column that holds the text."
        )
    kind = schema.field(field).type
    if pa.types.is_dictionary(kind):  # dictionary-encoded strings are strings
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(pa, kind)):
        raise UserError(
            f"Parquet file {path} column {json.dumps(field)} holds {schema.field(field).type}, not text; pass "
            "--text_field with a string column."
        )


def _is_string_view(pa: ModuleType, kind: Any) -> bool:
    """Arrow's string_view (pyarrow 16 and later)."""
    return hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind)


def _parquet_documents(path: Input, progress: Callable[[int], None] | None, field: str) -> Iterator[str]:
    """Documents of a Parquet file: the non-empty values of its `field` column, PARQUET_BATCH_ROWS at a time.
    Null values are skipped, as empty strings are: a missing text is no document."""
    size = _size(path)
    row = reported = 0
    with _open_parquet(path) as parquet:
        _check_text_column(parquet, path, field)
        total = max(parquet.metadata.num_rows, 1)
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field])
        while (batch := _next_batch(batches, path, row)) is not None:
            for text in _batch_texts(batch.column(0), path, row):
                if text is not None and text.strip():
                    yield text
            row += batch.num_rows
            if progress is not None:  # the file's bytes in proportion to its rows read
                done = size * row // total
                progress(done - reported)
                reported = done
    if progress is not None:
        progress(size - reported)


def _next_batch(batches: Iterator[Any], path: Input, row: int) -> Any:
    """The next record batch, None at the end, or a UserError for a damaged file (found only as it is read)."""
    try:
        return next(batches, None)
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        where = f"past row {row}" if row else "at all"
        raise UserError(
            f"Parquet file {path} could not be read {where} ({_one_line(e)}); the file is damaged: check that it is "
            "complete, or write it again."
        ) from None


def _one_line(error: Exception) -> str:
    """An exception's message on one printable line: pyarrow's span several lines, and may quote the damaged bytes
    it read; an error is one line on stderr."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(error)).split())


def _batch_texts(column: Any, path: Input, row: int) -> list[str | None]:
    """The column's values as Python strings, or a UserError naming the first row that is not UTF-8."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError:
                row += i
                break
        raise UserError(
            f"Parquet file {path} row {row + 1} is not UTF-8 text; write the column as UTF-8 strings."
        ) from None

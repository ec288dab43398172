"""Hugging Face `tokenizers` tokenizers: loading, training, and the special-token ids the trainer needs.

encoder-train follows RoBERTa's vocabulary conventions: `<s>` starts a sequence, `</s>` ends it (and
separates packed documents), `<pad>` right-pads rows, `<mask>` replaces selected tokens, `<unk>`
stands for the unknown. A BERT-style WordPiece tokenizer with `[CLS] [SEP] [PAD] [MASK] [UNK]` works
as well (`train_tokenizer(kind="wordpiece")` trains one): each role's names, as the families spell them, are
looked up in turn.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from encoder_train.data.zstd import ZstdReader
from encoder_train.errors import UserError, require
from encoder_train.families import FAMILIES

# Each role, with the token strings that may fill it: every family's spelling (families/), RoBERTa's first, then
# BERT's: {"bos": ("<s>", "[CLS]"), "pad": ("<pad>", "[PAD]"), ...}.
SPECIAL_TOKEN_NAMES: dict[str, tuple[str, ...]] = {
    role: tuple(dict.fromkeys(f.special_tokens[i] for f in FAMILIES.values()))
    for i, role in enumerate(("bos", "pad", "eos", "unk", "mask"))
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens. `all_ids` are never selected for masking nor drawn as random tokens."""

    bos: int
    pad: int
    eos: int
    unk: int
    mask: int
    all_ids: tuple[int, ...]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` written by the `tokenizers` library (or by `encoder-train tokenizer`)."""
    path = Path(path)
    if path.is_dir():
        hint = f" such as {path / 'tokenizer.json'}" if (path / "tokenizer.json").is_file() else ""
        raise UserError(f"--tokenizer_filepath {path} is a folder, not a tokenizer file; pass the tokenizer.json"
                        f"{hint} itself.")
    if path.exists() and not path.is_file():  # a pipe, a device
        raise UserError(f"tokenizer file {path} is not a regular file (a pipe or a device); pass "
                        "--tokenizer_filepath with a tokenizer.json file.")
    if not path.is_file():
        raise UserError(
            f"tokenizer file {path} does not exist; pass --tokenizer_filepath with a tokenizer.json "
            "(train one with `encoder-train tokenizer`)."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for unparsable files
        raise UserError(
            f"tokenizer file {path} could not be read as a Hugging Face tokenizers JSON file ({e}); "
            "pass a tokenizer.json saved with Tokenizer.save."
        ) from None


def special_tokens(tokenizer: Tokenizer, path: str | Path = "the tokenizer") -> SpecialTokens:
    """Find the ids of <s> <pad> </s> <unk> <mask> (or their BERT names); all five are required."""
    ids: dict[str, int] = {}
    for role, names in SPECIAL_TOKEN_NAMES.items():
        found = [tokenizer.token_to_id(name) for name in names]
        found = [i for i in found if i is not None]
        if not found:
            raise UserError(
                f"tokenizer {path} has no {names[0]} token (nor {names[1]}); masked-language modelling "
                f"needs {' '.join(n[0] for n in SPECIAL_TOKEN_NAMES.values())}: train the tokenizer "
                "with these special tokens (`encoder-train tokenizer` does)."
            )
        ids[role] = found[0]
    # Every token the tokenizer marks as special counts, not just the five roles above.
    added = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
    all_ids = tuple(sorted(added | set(ids.values())))
    return SpecialTokens(**ids, all_ids=all_ids)


# ---------------------------------------------------------------------------------------------------
# Reading text. Shared by tokenizer training and `data/prepare.py` (which imports it from here, as it
# also needs `load_tokenizer`; the other way round would be an import cycle).

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


def iter_texts(paths: Iterable[str | Path], progress: Callable[[int], None] | None = None,
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
    paths = [Path(p) for p in paths]
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


def check_inputs(paths: list[Path]) -> None:
    """Raise a UserError unless every path is a readable file and there is at least one."""
    if not paths:
        raise UserError("no input files were given; pass at least one text or .jsonl file with --input.")
    for path in paths:
        if path.is_dir():
            raise UserError(f"input {path} is a folder; pass the text files inside it (e.g. {path}/*.txt).")
        if path.exists() and not path.is_file():  # a pipe (`<(zcat x.gz)`), a device: read once, never again
            raise UserError(f"input {path} is not a regular file (a pipe or a device); save the text to a file "
                            "and pass that to --input (.gz and .zst files are read as they are).")
        if not path.is_file():
            raise UserError(f"input file {path} does not exist; check the path passed to --input.")
        if not os.access(path, os.R_OK):
            raise UserError(f"input file {path} cannot be read (permission denied); fix its permissions.")


def check_formats(paths: list[Path], text_field: str = "text") -> None:
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


def _documents(path: Path, progress: Callable[[int], None] | None, text_field: str) -> Iterator[str]:
    """The documents of one file, read as its name says (see `iter_texts`)."""
    if _is_parquet(path):
        return _parquet_documents(path, progress, text_field)
    if _is_jsonl(path):
        return _jsonl_documents(path, progress, text_field)
    return _paragraph_documents(path, progress)


def _is_jsonl(path: Path) -> bool:
    """True for `x.jsonl`, `x.jsonl.gz` and `x.jsonl.zst`."""
    name = path.name.lower()
    return name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))


def _is_parquet(path: Path) -> bool:
    """True for `x.parquet`."""
    return path.name.lower().endswith(".parquet")


def _paragraph_documents(path: Path, progress: Callable[[int], None] | None) -> Iterator[str]:
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


def _jsonl_documents(path: Path, progress: Callable[[int], None] | None, field: str = "text") -> Iterator[str]:
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


def _numbered_lines(path: Path, progress: Callable[[int], None] | None) -> Iterator[tuple[int, str]]:
    """Yield (line number from 1, line without its line ending) of a UTF-8 file, decompressing `.gz` and `.zst`."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by `with raw` below; opened apart to name the error
    except OSError as e:
        raise UserError(
            f"input file {path} cannot be read ({e.strerror}); check the path and its permissions."
        ) from None
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
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a truncated .gz or .zst an EOFError
            where = f"past line {number}" if number else "at all"
            check = ("check that the file is complete and valid Zstandard (`zstd -t` tests it)" if _is_zstd(path)
                     else "check that the file is complete (and valid gzip if it ends in .gz)")
            raise UserError(f"input file {path} could not be read {where} ({e}); {check}.") from None
        if progress is not None:
            progress(raw.tell() - reported)


def _bounded_lines(text: io.TextIOWrapper) -> Iterator[str]:
    """Lines of `text`, each read up to MAX_LINE_CHARS + 1 characters: a longer line is returned cut there (the
    caller refuses it) instead of being gathered whole."""
    while line := text.readline(MAX_LINE_CHARS + 1):
        yield line
        if len(line.removesuffix("\n")) > MAX_LINE_CHARS:
            return


def _decompressed(path: Path, raw: io.BufferedReader) -> io.BufferedIOBase:
    """The bytes of `raw`, gunzipped for `*.gz` and decompressed for `*.zst`, as they are read."""
    if _is_gzip(path):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if _is_zstd(path):
        return io.BufferedReader(ZstdReader(raw, _zstandard(path)))
    return raw


def _first_non_utf8_line(path: Path) -> int:
    """Number of the first line that is not valid UTF-8 (slow; only used to word an error)."""
    number = 0
    with open(path, "rb") as raw:
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


def _is_gzip(path: Path) -> bool:
    """True for `*.gz`."""
    return path.name.lower().endswith(".gz")


def _is_zstd(path: Path) -> bool:
    """True for `*.zst` (Zstandard, as `zstd` writes it)."""
    return path.name.lower().endswith(".zst")


def _zstandard(path: Path) -> ModuleType:
    """The zstandard package, or a UserError naming the extra that installs it."""
    return require("zstandard", "zstd", f"the Zstandard input {path}")


# Rows of a Parquet column converted to Python strings at a time: a batch of documents in memory, whatever the
# file's size (the other columns are never read).
PARQUET_BATCH_ROWS = 256

# Parquet bytes read from disk at a time. pyarrow's default (pre_buffer) instead reads a row group's whole column
# chunk first: 143 MB held for a 120 MB row group of text, where reading 1 MB at a time holds 24 MB, the same for
# a 40 MB row group (measured with pyarrow 26's memory pool, 256-row batches of 10 kB documents).
PARQUET_READ_BYTES = 1 << 20


def _open_parquet(path: Path) -> Any:
    """The `pyarrow.parquet.ParquetFile` at `path`, its footer read, or a UserError (not Parquet, cut short,
    unreadable). Typed Any: pyarrow is an optional extra, imported only here."""
    pq = require("pyarrow.parquet", "parquet", f"the Parquet input {path}")
    try:
        return pq.ParquetFile(path, buffer_size=PARQUET_READ_BYTES, pre_buffer=False)
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise UserError(
            f"Parquet file {path} could not be read ({_one_line(e)}); check that the file is complete and is Parquet "
            "(a file ending in .parquet is read as Parquet)."
        ) from None


def _check_text_column(parquet: Any, path: Path, field: str) -> None:
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


def _parquet_documents(path: Path, progress: Callable[[int], None] | None, field: str) -> Iterator[str]:
    """Documents of a Parquet file: the non-empty values of its `field` column, PARQUET_BATCH_ROWS at a time.
    Null values are skipped, as empty strings are: a missing text is no document."""
    size = path.stat().st_size
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


def _next_batch(batches: Iterator[Any], path: Path, row: int) -> Any:
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


def _batch_texts(column: Any, path: Path, row: int) -> list[str | None]:
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
# ---------------------------------------------------------------------------------------------------
# Training.

# RoBERTa's special tokens, in id order 0..4. `<mask>` swallows the space before it (lstrip), so
# "a <mask>." masks the word with its leading space, as the byte-level vocabulary spells words.
ROBERTA_SPECIAL_TOKENS = (
    AddedToken("<s>", special=True),
    AddedToken("<pad>", special=True),
    AddedToken("</s>", special=True),
    AddedToken("<unk>", special=True),
    AddedToken("<mask>", lstrip=True, special=True),
)

# BERT's, in the order BertWordPieceTokenizer gives them ids 0..4. "a [MASK]." masks the word alone: WordPiece
# splits on spaces before it looks words up.
BERT_SPECIAL_TOKENS = tuple(AddedToken(t, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))

# Documents handed to the Rust trainer per call: big enough to amortise the Python-to-Rust crossing.
TRAIN_BATCH_DOCUMENTS = 1000

# The largest --vocab_size: about four times the largest vocabularies in use (XLM-R's 250,002, Gemma's
# 256,000). Beyond it the embedding matrix alone outweighs a base-sized encoder, and the Rust trainer
# reserves memory in proportion to vocab_size before reading any text (10**12 aborts the process).
MAX_VOCAB_SIZE = 1_000_000


# The BPE trainer's time grows with the square of a word's length (400,000 letters without a space: a minute;
# 3 MB of base64: hours). Longer runs without a break are cut into separate training sequences of this many
# characters; no useful token is that long, and only the trainer sees the cuts.
MAX_TRAINING_RUN_CHARS = 1000
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAINING_RUN_CHARS},}}|\s{{{MAX_TRAINING_RUN_CHARS},}}")


def _training_pieces(text: str) -> list[str]:
    """`text`, cut inside every run of MAX_TRAINING_RUN_CHARS or more non-space (or space) characters."""
    pieces, start = [], 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_TRAINING_RUN_CHARS, run.end(), MAX_TRAINING_RUN_CHARS):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


def train_tokenizer(inputs: list[Path], output: Path, vocab_size: int, min_frequency: int = 2,
                    overwrite: bool = False, text_field: str = "text", kind: str = "bpe") -> Tokenizer:
    """Train a tokenizer on the files `iter_texts` reads (text, .jsonl, Parquet, .gz and .zst) and save it to
    `output`: `kind` "bpe" is RoBERTa's byte-level BPE (<s> <pad> </s> <unk> <mask>, "<s> A </s>"),
    "wordpiece" BERT's cased WordPiece ([PAD] [UNK] [CLS] [SEP] [MASK], "[CLS] A [SEP]").

    `text_field` names the .jsonl field and the Parquet column that hold the text. An existing `output`
    file is replaced only with `overwrite`.
    """
    # The specials and (BPE) the 256 bytes; WordPiece's alphabet is the text's, so one more token at least.
    smallest = len(BERT_SPECIAL_TOKENS) + 1 if kind == "wordpiece" else len(ROBERTA_SPECIAL_TOKENS) + 256
    if vocab_size < smallest:
        what = ("a WordPiece vocabulary starts with its 5 special tokens" if kind == "wordpiece" else
                f"a byte-level BPE vocabulary starts with {len(ROBERTA_SPECIAL_TOKENS)} special tokens and 256 byte "
                "tokens")
        raise UserError(f"vocab_size {vocab_size} is too small: {what}; pass --vocab_size {smallest} or more "
                        f"({'BERT uses 30522' if kind == 'wordpiece' else 'RoBERTa uses 50265'}).")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size} is too large: the largest vocabularies in use hold about 250,000 tokens; "
            f"pass --vocab_size {MAX_VOCAB_SIZE} or less (RoBERTa uses 50265)."
        )
    if min_frequency < 1:
        raise UserError(f"min_frequency {min_frequency} must be at least 1; pass --min_frequency 2 or more.")
    output = Path(output)
    if output.is_dir():
        raise UserError(f"tokenizer output {output} is a folder; pass a file path such as {output}/tokenizer.json.")
    if output.exists() and not output.is_file():  # replacing /dev/null (as root) would replace the device itself
        raise UserError(f"tokenizer output {output} is not a regular file (a device or a pipe); pass a file path "
                        "such as tokenizer.json.")
    if output.exists() and not overwrite:
        raise UserError(
            f"tokenizer output {output} already exists; pass --overwrite to replace it, or choose another --output."
        )

    tokenizer, trainer = (_wordpiece if kind == "wordpiece" else _byte_level_bpe)(vocab_size, min_frequency)
    documents = (piece for text in iter_texts(inputs, text_field=text_field) for piece in _training_pieces(text))
    batches = iter(lambda: list(itertools.islice(documents, TRAIN_BATCH_DOCUMENTS)), [])
    tokenizer.train_from_iterator(batches, trainer)
    _frame(tokenizer, kind)

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, output)  # never leave a half-written tokenizer.json behind
    except OSError as e:
        raise UserError(
            f"could not write the tokenizer to {output} ({e.strerror}); pass a writable --output."
        ) from None
    return tokenizer


def _byte_level_bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    """RoBERTa's byte-level BPE, untrained, and its trainer."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE())  # no unk_token: every byte is in the vocabulary
    # "Hello world" -> "Hello", "Ġworld": spaces are kept as part of the following word, so decoding
    # restores the text exactly; no space is added in front of the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(ROBERTA_SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet,  # all 256 bytes, even those the corpus lacks
        show_progress=sys.stderr.isatty(),  # a progress bar for a person at a terminal, not for logs
    )
    return tokenizer, trainer


def _wordpiece(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    """BERT's cased WordPiece (as `BertWordPieceTokenizer(lowercase=False)`), untrained, and its trainer:
    "Hello, world" -> "Hello", ",", "world"; "unaffable" -> "un", "##aff", "##able"."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BERT_SPECIAL_TOKENS),
        show_progress=sys.stderr.isatty(), continuing_subword_prefix="##",
    )
    return tokenizer, trainer


def _frame(tokenizer: Tokenizer, kind: str) -> None:
    """The post-processor: `<s> A </s>` and `<s> A </s></s> B </s>` (RoBERTa), or `[CLS] A [SEP]` and
    `[CLS] A [SEP] B [SEP]` (BERT); pretokenize packs rows without it. (sep, cls) are passed by position: the
    keyword for cls differs between tokenizers versions."""
    if kind == "wordpiece":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
        return
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", eos), ("<s>", bos), trim_offsets=True, add_prefix_space=False
    )


def word_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A synthetic word-level tokenizer for tests and benchmarks that need no training text.

    RoBERTa's five special tokens at ids 0..4 (`<s> <pad> </s> <unk> <mask>`), then the words
    `w5 .. w{vocab_size-1}`, split on whitespace: the text "w5 w6" is ids [5, 6].
    """
    specials = [t.content for t in ROBERTA_SPECIAL_TOKENS]  # names only: the words are split on whitespace
    words = {tok: i for i, tok in enumerate(specials)}
    words.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    return tokenizer

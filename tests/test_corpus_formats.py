"""Real corpora in: Parquet, Zstandard and --text_field, read by `tokenizer` and `pretokenize` exactly as plain text.

Every file here is written with the real pyarrow and zstandard packages; the commands run through the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import encoder_train.textfiles as textfiles
from encoder_train.cli import main
from encoder_train.textfiles import iter_texts

WORDS = "the a of model token naïve café 日本語 🙂 (x) 3.14 it's \"quoted\"".split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Short numbered documents of mixed scripts, every third on two lines (no blank line inside any)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
        docs.append(text + ("\n" + " ".join(rng.choice(WORDS) for _ in range(3)) if i % 3 == 0 else ""))
    return docs


DOCS = make_documents(300)


def zst(data: bytes, frames: int = 1) -> bytes:
    """`data` as Zstandard, in `frames` frames one after another (as pzstd and `zstd -T` write), with checksums."""
    step = math.ceil(len(data) / frames)
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    return b"".join(compressor.compress(data[i : i + step]) for i in range(0, len(data), step))


def write_text(path: Path, docs: list[str]) -> Path:
    """Plain text, documents separated by blank lines; Zstandard when the name ends in .zst."""
    data = ("\n\n".join(docs) + "\n").encode()
    path.write_bytes(zst(data) if path.suffix == ".zst" else data)
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text", frames: int = 1) -> Path:
    """One {"id": ..., field: ...} object per line; Zstandard when the name ends in .zst."""
    data = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    path.write_bytes(zst(data, frames) if path.suffix == ".zst" else data)
    return path


def write_parquet(path: Path, docs: list[str | None], field: str = "content", rows_per_group: int = 100,
                  kind: pa.DataType | None = None) -> Path:
    """A Parquet file with an int64 "id" column and the documents in `field`, in several row groups."""
    table = pa.table({"id": pa.array(range(len(docs)), pa.int64()), field: pa.array(docs, kind or pa.string())})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


# Each format of the same documents, with the flags that read it.
SOURCES = {
    "corpus.txt": (write_text, []),
    "corpus.txt.zst": (write_text, []),
    "corpus.jsonl": (write_jsonl, []),
    "corpus.jsonl.zst": (write_jsonl, []),
    "content.jsonl.zst": (lambda path, docs: write_jsonl(path, docs, "content"), ["--text_field", "content"]),
    "corpus.parquet": (write_parquet, ["--text_field", "content"]),
}


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the SHA-256 of its bytes: what a failed command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    path = folder / "tokenizer.json"
    corpus = write_text(folder / "corpus.txt", DOCS)
    assert main(["tokenizer", "--input", str(corpus), "--output", str(path), "--vocab_size", "300"]) == 0
    return path


def pretokenize_args(inputs: list[Path], tokenizer: Path, out: Path) -> list[str]:
    return ["pretokenize", "--input", *map(str, inputs), "--tokenizer_filepath", str(tokenizer), "--output_dir",
            str(out), "--seq_len", "32", "--rows_per_shard", "20", "--val_fraction", "0.1"]


# --- the same documents in every format give the same tokenizer and the same shards --------------


def test_tokenizer_learns_the_same_vocabulary_from_every_format(tmp_path, capsys):
    written = {}
    for name, (write, flags) in SOURCES.items():
        corpus = write(tmp_path / name, DOCS)
        output = tmp_path / f"{name}.tokenizer.json"
        assert main(["tokenizer", "--input", str(corpus), "--output", str(output), "--vocab_size", "300",
                     *flags]) == 0, capsys.readouterr().err
        written[name] = output.read_bytes()
    assert all(data == written["corpus.txt"] for data in written.values()), [
        name for name, data in written.items() if data != written["corpus.txt"]
    ]


def test_pretokenize_writes_byte_identical_shards_from_every_format(tmp_path, tokenizer, capsys):
    shards = {}
    for name, (write, flags) in SOURCES.items():
        corpus = write(tmp_path / name, DOCS)
        assert main([*pretokenize_args([corpus], tokenizer, tmp_path / f"out-{name}"), *flags]) == 0, (
            capsys.readouterr().err
        )
        shards[name] = tree(tmp_path / f"out-{name}")
    reference = shards["corpus.txt"]
    assert len([f for f in reference if f.startswith("train/")]) > 2  # several shards, not one
    for name, files in shards.items():
        assert files == reference, name


def test_parquet_nulls_and_blank_values_are_skipped(tmp_path):
    docs: list[str | None] = []
    for i, doc in enumerate(DOCS):
        docs.append(doc)
        docs.append([None, "", "   \n"][i % 3])  # no document, as a blank paragraph or "text": "" is none
    path = write_parquet(tmp_path / "holes.parquet", docs, field="text", rows_per_group=70)
    assert list(iter_texts([path])) == DOCS


STRING_TYPES = [pa.large_string(), pa.dictionary(pa.int32(), pa.string())] + (
    [pa.string_view()] if hasattr(pa, "string_view") else []  # pyarrow 16 and later
)


@pytest.mark.parametrize("kind", STRING_TYPES, ids=str)
def test_parquet_string_types(tmp_path, kind):
    path = write_parquet(tmp_path / "typed.parquet", DOCS[:20], kind=kind)
    assert list(iter_texts([path], text_field="content")) == DOCS[:20]


def test_parquet_is_read_a_bounded_batch_at_a_time(tmp_path):
    rows = 1000
    docs = make_documents(rows, seed=3)
    path = write_parquet(tmp_path / "one_group.parquet", docs, rows_per_group=rows)  # one row group: one chunk
    batch = textfiles.PARQUET_BATCH_ROWS
    assert 1 <= batch <= 4096 and batch < rows
    seen: list[int] = []
    documents = iter_texts([path], progress=seen.append, text_field="content")
    first = [next(documents) for _ in range(batch)]
    assert first == docs[:batch] and seen == []  # the first batch's documents come before the next is read
    assert next(documents) == docs[batch]
    assert len(seen) == 1 and seen[0] == path.stat().st_size * batch // rows
    assert [*first, docs[batch], *documents] == docs
    assert len(seen) == math.ceil(rows / batch) + 1 and sum(seen) == path.stat().st_size


def test_zst_of_several_frames_and_its_progress(tmp_path):
    path = tmp_path / "frames.jsonl.zst"
    data = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    path.write_bytes(zst(data, frames=5))
    seen: list[int] = []
    assert list(iter_texts([path], progress=seen.append)) == DOCS
    assert sum(seen) == path.stat().st_size  # compressed bytes, as the progress bar's total


def test_inputs_of_different_formats_are_one_stream(tmp_path, tokenizer, capsys):
    one = write_text(tmp_path / "all.txt", DOCS)
    parts = [write_parquet(tmp_path / "a.parquet", DOCS[:100], field="text"),
             write_jsonl(tmp_path / "b.jsonl.zst", DOCS[100:200]), write_text(tmp_path / "c.txt.zst", DOCS[200:])]
    assert main(pretokenize_args([one], tokenizer, tmp_path / "one")) == 0
    assert main(pretokenize_args(parts, tokenizer, tmp_path / "parts")) == 0
    assert tree(tmp_path / "one") == tree(tmp_path / "parts")


# --- bad input: one sentence naming the file, exit code 2, nothing written over -------------------


def damaged_parquet(path: Path) -> Path:
    """A Parquet file whose fifth row group's page header is overwritten: its footer reads, its rows 400 to 499
    do not (the batch of rows 256 to 511 fails)."""
    write_parquet(path, DOCS * 2, rows_per_group=100)
    offset = pq.ParquetFile(path).metadata.row_group(4).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path


def cut(path: Path, drop: int) -> Path:
    path.write_bytes(path.read_bytes()[:-drop])
    return path


def flipped(path: Path) -> Path:
    """A .zst with one byte changed in the middle: the frame's checksum (or the decoder) tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    return path


def bad_field(path: Path) -> Path:
    """300 good lines, then one without the field: found after shards have been written."""
    write_jsonl(path, DOCS)
    with path.open("a") as f:
        f.write(json.dumps({"id": 300, "body": "the text is under another name"}) + "\n")
    return path


# name, file maker, extra flags, what the message says (a regular expression)
BAD_INPUTS = [
    ("not.parquet", lambda p: write_text(p, DOCS), [], r"Parquet file \S*not.parquet could not be read \(.*"
     r"Parquet magic bytes not found.*\); check that the file is complete and is Parquet"),
    ("cut.parquet", lambda p: cut(write_parquet(p, DOCS), 100), ["--text_field", "content"],
     r"Parquet file \S*cut.parquet could not be read"),
    ("damaged.parquet", damaged_parquet, ["--text_field", "content"],
     r"Parquet file \S*damaged.parquet could not be read past row 256 \(.*\); the file is damaged"),
    ("cut.jsonl.zst", lambda p: cut(write_jsonl(p, DOCS, frames=4), 10), [],  # three frames whole, one cut
     r"input file \S*cut.jsonl.zst could not be read past line \d+ \(the file ends inside a Zstandard frame: it "
     r"was cut short\); check that the file is complete and valid Zstandard"),
    ("flipped.txt.zst", lambda p: flipped(write_text(p, DOCS)), [],
     r"input file \S*flipped.txt.zst could not be read .*\(zstd .*error.*\); check that the file is complete"),
    ("plain.txt.zst", lambda p: p.write_text("not compressed at all\n") and p, [],
     r"input file \S*plain.txt.zst could not be read at all \(zstd .*Unknown frame descriptor\)"),
    ("columns.parquet", lambda p: write_parquet(p, DOCS), [],
     r'Parquet file \S*columns.parquet has no column "text" \(its columns: "id", "content"\); pass --text_field'),
    ("ints.parquet", lambda p: write_parquet(p, DOCS), ["--text_field", "id"],
     r'Parquet file \S*ints.parquet column "id" holds int64, not text; pass --text_field with a string column'),
    ("content.jsonl.zst", lambda p: write_jsonl(p, DOCS), ["--text_field", "content"],
     r'\S*content.jsonl.zst line 1 has no "content" string field; each line of a .jsonl file must be one JSON '
     r'object like \{"content": "..."\} \(this line has "id", "text": pass --text_field to read one of them\)'),
    ("late.jsonl", bad_field, [], r'\S*late.jsonl line 301 has no "text" string field'),
]


def expect_one_error(capsys, rc: int, pattern: str, name: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("encoder-train: error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err and name in err
    assert re.search(pattern, err), err


@pytest.mark.parametrize(("name", "make", "flags", "pattern"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_pretokenize_bad_input_leaves_the_old_shards(tmp_path, tokenizer, capsys, name, make, flags, pattern):
    out = tmp_path / "out"
    assert main(pretokenize_args([write_text(tmp_path / "good.txt", DOCS[:150])], tokenizer, out)) == 0
    before = tree(out)
    capsys.readouterr()
    rc = main([*pretokenize_args([make(tmp_path / name)], tokenizer, out), "--overwrite", *flags])
    expect_one_error(capsys, rc, pattern, name)
    assert tree(out) == before  # not one old shard removed, not one new shard (nor .pt.new) left


@pytest.mark.parametrize(("name", "make", "flags", "pattern"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_tokenizer_bad_input_leaves_the_old_tokenizer(tmp_path, capsys, name, make, flags, pattern):
    output = tmp_path / "tokenizer.json"
    output.write_text("the tokenizer of an earlier run")
    rc = main(["tokenizer", "--input", str(make(tmp_path / name)), "--output", str(output), "--vocab_size", "300",
               "--overwrite", *flags])
    expect_one_error(capsys, rc, pattern, name)
    assert output.read_text() == "the tokenizer of an earlier run"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tokenizer")] == ["tokenizer.json"]


def test_a_parquet_column_is_checked_before_any_file_is_read(tmp_path, capsys):
    # The second file's missing column stops the run before the first file's text is trained on.
    first = write_text(tmp_path / "big.txt", DOCS)
    second = write_parquet(tmp_path / "second.parquet", DOCS, field="body")
    rc = main(["tokenizer", "--input", str(first), str(second), "--output", str(tmp_path / "t.json"),
               "--vocab_size", "300"])
    expect_one_error(capsys, rc, r'second.parquet has no column "text" \(its columns: "id", "body"\)',
                     "second.parquet")


def test_a_missing_optional_package_names_its_extra(tmp_path, capsys, monkeypatch):
    parquet = write_parquet(tmp_path / "c.parquet", DOCS[:5], field="text")
    compressed = write_jsonl(tmp_path / "c.jsonl.zst", DOCS[:5])
    for module, path, extra in (("pyarrow", parquet, "parquet"), ("zstandard", compressed, "zstd")):
        with monkeypatch.context() as m:
            for loaded in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
                m.setitem(sys.modules, loaded, None)  # `import pyarrow.parquet` now fails as if it were absent
            rc = main(["tokenizer", "--input", str(path), "--output", str(tmp_path / "t.json")])
        expect_one_error(capsys, rc, rf"the \w+ input \S*{path.name} needs the {module} package, which is not "
                         rf"installed; pip install .*\[{extra}\]'? adds it", path.name)
    assert not (tmp_path / "t.json").exists()


def test_an_empty_text_field_is_refused(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:5])
    rc = main(["tokenizer", "--input", str(corpus), "--output", str(tmp_path / "t.json"), "--text_field", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "--text_field is empty" in err and "Traceback" not in err

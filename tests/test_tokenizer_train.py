"""Training the byte-level BPE tokenizer, and reading text / .jsonl / .gz inputs."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import encoder_train.textfiles as textfiles
from encoder_train.errors import UserError
from encoder_train.textfiles import iter_texts
from encoder_train.tokenizer import load_tokenizer, special_tokens, train_tokenizer

WORDS = 'the a of model token naïve café über 日本語 Ελληνικά emoji 🙂 (x) [y] {z} 3.14 -- it\'s "quoted"'.split()
VOCAB = 400


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Short documents of mixed-script words and punctuation; some span two lines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        text = " ".join(words) + rng.choice([".", "!", "?", ";"])
        if i % 3 == 0:
            text += "\n" + " ".join(rng.choice(WORDS) for _ in range(4))
        docs.append(text)
    return docs


def write_text(path: Path, docs: list[str]) -> Path:
    """Plain text: documents separated by blank lines (gzip-compressed when the name ends in .gz)."""
    data = "\n\n".join(docs).encode("utf-8") + b"\n"
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def write_jsonl(path: Path, docs: list[str]) -> Path:
    """One {"text": ...} object per line (gzip-compressed when the name ends in .gz)."""
    data = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tokenizer, Path]:
    folder = tmp_path_factory.mktemp("tok")
    corpus = write_text(folder / "corpus.txt", make_documents(300))
    output = folder / "nested" / "dir" / "tokenizer.json"  # parent folders are created
    return train_tokenizer([corpus], output, vocab_size=VOCAB), output


def test_special_tokens_have_roberta_ids(trained):
    tokenizer, _ = trained
    assert [tokenizer.id_to_token(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    ids = special_tokens(tokenizer)
    assert (ids.bos, ids.pad, ids.eos, ids.unk, ids.mask) == (0, 1, 2, 3, 4)
    assert tokenizer.get_added_tokens_decoder()[4].lstrip  # "<mask>" takes the space before it, as RoBERTa
    assert 261 < tokenizer.get_vocab_size() <= VOCAB


@pytest.mark.parametrize(
    "text",
    [
        "the model of a token.",
        "naïve café über 日本語 — Ελληνικά 🙂!",
        '  leading spaces, "quotes", tabs\there\nand a newline; (x) [y] {z} 3.14',
        "unseen: ЖЩЮ ₿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width",  # characters absent from the corpus: byte tokens
    ],
)
def test_encode_decode_round_trip(trained, text):
    tokenizer, _ = trained
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert 3 not in ids  # byte-level: nothing is ever <unk>


def test_roberta_post_processing(trained):
    tokenizer, _ = trained
    single = tokenizer.encode("the model").ids
    assert single[0] == 0 and single[-1] == 2 and 2 not in single[1:-1]
    pair = tokenizer.encode("the model", "a token").ids
    a = tokenizer.encode("the model", add_special_tokens=False).ids
    b = tokenizer.encode("a token", add_special_tokens=False).ids
    assert pair == [0, *a, 2, 2, *b, 2]


def test_saved_file_loads(trained):
    tokenizer, output = trained
    reloaded = Tokenizer.from_file(str(output))
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    text = "naïve café 🙂"
    assert load_tokenizer(output).encode(text).ids == tokenizer.encode(text).ids


@pytest.mark.parametrize("name", ["docs.txt", "docs.txt.gz", "docs.jsonl", "docs.jsonl.gz"])
def test_every_input_format_reads_the_same_documents(tmp_path, name):
    docs = make_documents(50)
    write = write_jsonl if ".jsonl" in name else write_text
    assert list(iter_texts([write(tmp_path / name, docs)])) == docs


def test_trains_from_gzipped_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl.gz", make_documents(100))
    tokenizer = train_tokenizer([path], tmp_path / "tok.json", vocab_size=300)
    assert tokenizer.token_to_id("<mask>") == 4
    assert tokenizer.get_vocab_size() > 261  # merges were learned from the decompressed text


def test_paragraph_rules(tmp_path):
    path = tmp_path / "odd.txt"
    # A byte-order mark, Windows line endings, a whitespace-only separator line and extra blank lines.
    path.write_bytes(b"\xef\xbb\xbffirst line\r\nsecond line\r\n   \r\n\r\n\r\nnext doc  \n\n\nlast")
    assert list(iter_texts([path])) == ["first line\nsecond line", "next doc  ", "last"]


def test_a_paragraph_too_long_is_cut_at_line_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(textfiles, "MAX_DOCUMENT_CHARS", 20)  # bounds memory on files without blank lines
    lines = [f"line {i:03d}" for i in range(10)]  # 8 characters each
    documents = list(iter_texts([write_text(tmp_path / "long.txt", ["\n".join(lines)])]))
    assert documents == ["\n".join(lines[i : i + 2]) for i in range(0, 10, 2)]


def test_jsonl_skips_blank_lines_and_empty_texts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": "two", "meta": 1}\n')
    assert list(iter_texts([path])) == ["one", "two"]


def test_progress_counts_every_byte(tmp_path):
    path = write_text(tmp_path / "d.txt.gz", make_documents(400))
    seen = []
    list(iter_texts([path], progress=seen.append))
    assert sum(seen) == path.stat().st_size  # compressed bytes, as the progress bar's total


# --- errors: one sentence naming the file or value ----------------------------------------------


def test_missing_input(tmp_path):
    with pytest.raises(UserError, match="nope.txt does not exist"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t.json", vocab_size=VOCAB)


def test_folder_input(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        list(iter_texts([tmp_path]))


def test_no_inputs(tmp_path):
    with pytest.raises(UserError, match="no input files"):
        train_tokenizer([], tmp_path / "t.json", vocab_size=VOCAB)


def test_empty_input(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(UserError, match="blank.txt holds no text"):
        train_tokenizer([blank], tmp_path / "t.json", vocab_size=VOCAB)
    assert not (tmp_path / "t.json").exists()


def test_vocab_too_small(tmp_path):
    corpus = write_text(tmp_path / "c.txt", make_documents(10))
    with pytest.raises(UserError, match="vocab_size 260 is too small.*261 or more"):
        train_tokenizer([corpus], tmp_path / "t.json", vocab_size=260)


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2 is not valid JSON"):
        train_tokenizer([path], tmp_path / "t.json", vocab_size=VOCAB)


@pytest.mark.parametrize("line", ['{"body": "x"}', '["text"]', '{"text": 3}'])
def test_jsonl_line_without_text(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(UserError, match=r'bad.jsonl line 3 has no "text" string field'):
        list(iter_texts([path]))


def test_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok\n" * 5000 + "café\n".encode("latin-1"))  # past the decoder's first chunk
    with pytest.raises(UserError, match="latin1.txt line 5001 is not UTF-8"):
        list(iter_texts([path]))


def test_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "fake.txt.gz"
    path.write_text("plain text with a .gz name\n")
    with pytest.raises(UserError, match="fake.txt.gz could not be read"):
        list(iter_texts([path]))


def test_truncated_gzip(tmp_path):
    path = write_text(tmp_path / "cut.txt.gz", make_documents(200))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError, match="cut.txt.gz could not be read"):
        list(iter_texts([path]))

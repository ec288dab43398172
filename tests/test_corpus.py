"""The quickstart corpus built from the documentation that ships with CPython."""

from __future__ import annotations

import pytest

from encoder_train.errors import UserError
from encoder_train.quickstart.corpus import _wanted, write_stdlib_corpus
from encoder_train.textfiles import iter_texts


def test_capped_corpus_reads_back_one_document_each(tmp_path):
    info = write_stdlib_corpus(tmp_path / "sub" / "corpus.txt", max_bytes=50_000)
    text = info.path.read_text(encoding="utf-8")
    assert info.bytes == info.path.stat().st_size <= 50_000
    assert info.bytes > 40_000  # filled up to the cap, not far below it
    documents = list(iter_texts([info.path]))
    assert len(documents) == info.documents == info.topic_documents > 3
    assert "\n\n".join(documents) + "\n" == text  # no blank line inside a document
    assert not list(tmp_path.rglob("*.tmp"))


def test_cap_below_one_document(tmp_path):
    with pytest.raises(UserError, match="max_bytes 10 is smaller than the first document"):
        write_stdlib_corpus(tmp_path / "c.txt", max_bytes=10)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_stdlib_corpus(folder / "a.txt"), write_stdlib_corpus(folder / "b.txt")


def test_full_corpus_has_topics_and_docstrings(full):
    info, _ = full
    assert info.topic_documents > 50 and info.docstring_documents > 100
    assert info.bytes > 1_000_000
    text = info.path.read_text(encoding="utf-8")
    assert "json.dumps: Serialize" in text  # a function's docstring, under its dotted name
    assert len(list(iter_texts([info.path]))) == info.documents


def test_corpus_is_deterministic(full):
    a, b = full
    assert a.path.read_bytes() == b.path.read_bytes()


def test_imports_print_nothing_here(tmp_path, capfd):
    write_stdlib_corpus(tmp_path / "c.txt")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("json", True),
        ("email.mime.text", True),
        ("antigravity", False),  # opens a web browser
        ("this", False),  # prints the Zen of Python
        ("idlelib.pyshell", False),
        ("tkinter", False),
        ("turtledemo.clock", False),
        ("unittest.__main__", False),  # runs code when imported
        ("unittest.test.test_case", False),
        ("ctypes.test", False),
        ("_collections", False),
    ],
)
def test_skipped_modules(name, wanted):
    assert _wanted(name) is wanted

"""The offline suite's data, made from the docstrings of the standard library: no download, a second to write.

`write_offline_data(DIR)` (the CLI's `encoder-train eval-data --output_dir DIR`) writes:

    DIR/offline.yaml                  the bundled configs/eval/offline.yaml, whose paths are relative to it
    DIR/docstrings/                   a BEIR-layout retrieval task (corpus.jsonl, queries.jsonl, qrels/test.tsv):
                                      each query is a docstring's first sentence, its one relevant document the
                                      rest of that docstring, after the dotted name it documents
    DIR/docstrings-train.tsv          query<TAB>positive pairs made the same way from OTHER modules (TRAIN_MODULES):
                                      the fine-tune never sees a test query or document
    DIR/sts/test.tsv, sts/train.tsv   scored sentence pairs (header sentence1, sentence2, score) from the test and
                                      the training modules: a docstring's first sentence beside its own next
                                      sentence (2), the first sentence of another docstring of the same module (1),
                                      and that of a docstring of another module (0)

A docstring counts when its first sentence has MIN_QUERY_WORDS words or more and the rest MIN_DOCUMENT_WORDS; a
first sentence that two docstrings share ("Return self==value.") is left out, so that every query has one answer.
The files are the same on every run of one Python version (sorted names, a seeded draw); another version's
docstrings differ a little, and so do its files.

Files already in DIR are kept when they hold what would be written, and refused (one sentence, nothing replaced)
when they differ: an edited suite is never overwritten.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from encoder_train.config import BUNDLED_CONFIG_DIR
from encoder_train.errors import UserError

SUITE = BUNDLED_CONFIG_DIR / "eval" / "offline.yaml"
# The test queries come from these modules, the training pairs from TRAIN_MODULES: about 440 and 900 docstrings on
# CPython 3.11. Pure-Python modules that import nothing outside the standard library and do nothing on import.
TEST_MODULES = ("argparse", "calendar", "collections", "csv", "datetime", "email.message", "ftplib", "inspect",
                "json", "logging.handlers", "pathlib", "random", "shutil", "statistics", "tarfile", "threading",
                "urllib.parse", "zipfile")
TRAIN_MODULES = ("ast", "base64", "cmd", "codecs", "configparser", "contextlib", "dataclasses", "decimal", "difflib",
                 "dis", "email.utils", "enum", "fileinput", "fnmatch", "fractions", "functools", "graphlib", "gzip",
                 "hmac", "http.client", "http.cookies", "imaplib", "io", "ipaddress", "linecache", "locale",
                 "logging", "lzma", "mimetypes", "numbers", "optparse", "os", "pickletools", "pkgutil", "platform",
                 "poplib", "queue", "quopri", "re", "sched", "selectors", "smtplib", "socket", "socketserver",
                 "subprocess", "sysconfig", "tempfile", "textwrap", "timeit", "tokenize", "trace", "traceback",
                 "typing", "unittest.case", "unittest.mock", "urllib.request", "uuid", "weakref", "xml.dom.minidom",
                 "xml.etree.ElementTree", "zipimport")
MIN_QUERY_WORDS = 4
MIN_DOCUMENT_WORDS = 8
SEED = 0  # the draw of the STS pairs' partners
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # a sentence ends at . ! or ? before white space


@dataclass(frozen=True)
class Docstring:
    module: str
    name: str  # dotted, from the module: json.JSONDecoder.decode
    sentences: list[str]  # the docstring, white space collapsed, cut after . ! ?


@dataclass(frozen=True)
class OfflineData:
    """What write_offline_data wrote."""

    suite: Path
    queries: int
    documents: int
    train_pairs: int
    sts_pairs: int
    sts_train_pairs: int


def write_offline_data(output_dir: Path) -> OfflineData:
    output_dir = Path(output_dir)
    test, train = docstrings(TEST_MODULES), docstrings(TRAIN_MODULES)
    files: dict[str, str] = {"offline.yaml": SUITE.read_text(encoding="utf-8")}
    corpus = [{"_id": f"d{i}", "title": d.name, "text": " ".join(d.sentences[1:])} for i, d in enumerate(test)]
    queries = [{"_id": f"q{i}", "text": d.sentences[0]} for i, d in enumerate(test)]
    files["docstrings/corpus.jsonl"] = "".join(json.dumps(r) + "\n" for r in corpus)
    files["docstrings/queries.jsonl"] = "".join(json.dumps(r) + "\n" for r in queries)
    files["docstrings/qrels/test.tsv"] = "query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(test)))
    files["docstrings-train.tsv"] = "query\tpositive\n" + "".join(
        f"{d.sentences[0]}\t{d.name} {' '.join(d.sentences[1:])}\n" for d in train)
    sts_test, sts_train = scored_pairs(test), scored_pairs(train)
    files["sts/test.tsv"], files["sts/train.tsv"] = _tsv(sts_test), _tsv(sts_train)
    for name, text in files.items():
        _write_once(output_dir / name, text)
    return OfflineData(output_dir / "offline.yaml", len(queries), len(corpus), len(train), len(sts_test),
                       len(sts_train))


def docstrings(modules: tuple[str, ...]) -> list[Docstring]:
    """The usable docstrings of `modules` (those this Python has), sorted by name, their first sentences unique."""
    found = [d for module in modules for d in _module_docstrings(module)
             if len(d.sentences) > 1 and len(d.sentences[0].split()) >= MIN_QUERY_WORDS
             and len(" ".join(d.sentences[1:]).split()) >= MIN_DOCUMENT_WORDS]
    firsts: dict[str, int] = defaultdict(int)
    for d in found:
        firsts[d.sentences[0]] += 1
    return sorted((d for d in found if firsts[d.sentences[0]] == 1), key=lambda d: d.name)


def scored_pairs(found: list[Docstring]) -> list[tuple[str, str, float]]:
    """Three pairs per docstring that has a module mate: its first sentence beside its second (2), beside the first
    sentence of another docstring of its module (1), of another module (0)."""
    rng = random.Random(SEED)
    by_module: dict[str, list[Docstring]] = defaultdict(list)
    for d in found:
        by_module[d.module].append(d)
    pairs = []
    for d in found:
        mates = [m for m in by_module[d.module] if m is not d]
        others = [o for o in found if o.module != d.module]
        if not mates or not others:
            continue
        first = d.sentences[0]
        pairs += [(first, d.sentences[1], 2.0), (first, rng.choice(mates).sentences[0], 1.0),
                  (first, rng.choice(others).sentences[0], 0.0)]
    return pairs


def _module_docstrings(module_name: str) -> Iterator[Docstring]:
    """The docstrings of the classes, functions, methods and properties a module defines, by name."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # not built on this platform
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io) warn when touched
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isclass(obj):
                yield from _docstring(module_name, f"{module_name}.{name}", vars(obj).get("__doc__"))
                for member_name, member in sorted(vars(obj).items()):
                    member = getattr(member, "__func__", member)  # classmethod / staticmethod
                    if not member_name.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                        yield from _docstring(module_name, f"{module_name}.{name}.{member_name}", member.__doc__)
            elif inspect.isroutine(obj):
                yield from _docstring(module_name, f"{module_name}.{name}", obj.__doc__)


def _docstring(module: str, name: str, doc: object) -> Iterator[Docstring]:
    if isinstance(doc, str) and doc.strip():
        text = " ".join(inspect.cleandoc(doc).split())
        # No tab may reach a .tsv cell: split() above turned every tab and newline into one space.
        yield Docstring(module, name, [s for s in SENTENCE_END.split(text) if s])


def _tsv(pairs: list[tuple[str, str, float]]) -> str:
    return "sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{score:g}\n" for a, b, score in pairs)


def _write_once(path: Path, text: str) -> None:
    """Write `path` (aside, then renamed), unless it holds `text` already; refuse one that holds anything else."""
    if path.exists():
        try:
            same = path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            return
        raise UserError(f"{path} exists and differs from what eval-data writes; pass another --output_dir, or move "
                        "the file away (it is kept as it is).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path.parent} cannot be created ({e.strerror}); pass an --output_dir that can.") from None
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_text(text, encoding="utf-8")
    os.replace(aside, path)

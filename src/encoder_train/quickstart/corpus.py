"""The quickstart corpus: English text that ships with every CPython install, so a first run needs no
download.

Two sources, in this order, each sorted by name so the file is the same for a given Python install:

1. the documentation topics that `help("if")` shows (`pydoc_data.topics.topics`, about 0.5 MB);
2. the docstrings of standard-library modules and of the classes, functions and methods they define
   (about 1.4 MB on CPython 3.11). Collecting them means importing some 500 modules, so that happens
   in a child process: whatever an import prints, changes or leaves behind stays there.

The output is plain text in the format `iter_texts` reads: one document per paragraph, documents
separated by one blank line, no blank line inside a document.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from encoder_train.errors import UserError

# Modules never imported: they open windows or browsers, print on import, read the terminal, or only
# hold tests. Matched against every dotted component of a module name.
SKIPPED_MODULES = frozenset(
    {
        "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests",
        "idle_test", "readline", "rlcompleter", "ensurepip", "venv", "lib2to3", "pydoc_data",
    }
)  # fmt: skip

# The child process that collects docstrings may take this long (it takes a few seconds).
DOCSTRING_TIMEOUT_S = 600


@dataclass(frozen=True)
class CorpusInfo:
    """What `write_stdlib_corpus` wrote."""

    path: Path
    documents: int
    """Paragraph-separated documents in the file."""
    bytes: int
    """Size of the file (UTF-8)."""
    topic_documents: int
    """Documents from `pydoc_data.topics`."""
    docstring_documents: int
    """Documents from module, class and function docstrings."""


def write_stdlib_corpus(path: Path, max_bytes: int | None = None) -> CorpusInfo:
    """Write the standard-library documentation corpus to `path`, stopping before `max_bytes`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = max_bytes if max_bytes is not None else float("inf")
    counts = {"topics": 0, "docstrings": 0}
    written = 0

    def sources() -> Iterator[tuple[str, str]]:
        for text in _topic_documents():
            yield "topics", text
        # Only start the (slower) child process when the topics did not fill the budget.
        for text in _docstring_documents():
            yield "docstrings", text

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for source, text in sources():
            document = _one_paragraph(text)
            if not document:
                continue
            chunk = ("\n" if written else "") + document + "\n"  # blank line between documents
            size = len(chunk.encode("utf-8"))
            if written + size > limit:
                break
            f.write(chunk)
            written += size
            counts[source] += 1
    if written == 0:
        tmp.unlink()
        raise UserError(f"max_bytes {max_bytes} is smaller than the first document of the corpus; pass a larger "
                        "--corpus_bytes (100000 or more), or leave it out for the whole corpus.")
    os.replace(tmp, path)  # a half-written corpus never sits at `path`
    return CorpusInfo(
        path=path,
        documents=counts["topics"] + counts["docstrings"],
        bytes=written,
        topic_documents=counts["topics"],
        docstring_documents=counts["docstrings"],
    )


def _one_paragraph(text: str) -> str:
    """Drop blank lines and trailing spaces so that the text reads back as a single document."""
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def _topic_documents() -> Iterator[str]:
    """The `help()` topics, sorted by topic name (absent on Pythons built without pydoc_data)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield topics[name]


def _docstring_documents() -> Iterator[str]:
    """Run `_collect_docstrings` in a child Python (same interpreter) and yield what it wrote."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "docstrings.jsonl"
        # -I -S: no environment variables, no site-packages and no .pth hooks (setuptools replaces
        # distutils from one), so only the standard library is seen. This package is appended after
        # it for the child to import this module.
        package_root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.append({package_root!r}); import {__name__} as m; m._collect_docstrings()"
        child = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code, out],
            check=False,  # a failure is reported below, with the child's stderr
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # imports may print, even from C code; nothing of it is wanted
            stderr=subprocess.PIPE,
            cwd=folder,
            timeout=DOCSTRING_TIMEOUT_S,
        )
        if child.returncode != 0:
            stderr = child.stderr.decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"collecting standard-library docstrings failed:\n{stderr}")
        with open(out, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _collect_docstrings() -> None:
    """Child-process entry point: write one JSON string per module document to the file in argv[1]."""
    warnings.simplefilter("ignore")  # deprecated modules warn on import
    seen: set[str] = set()  # docstrings repeat (re-exports, inherited slots); keep the first only
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        for name in _stdlib_module_names():
            module = _quiet_import(name)
            if module is None:
                continue
            document = "\n".join(_module_docstrings(module, seen))
            if document:
                out.write(json.dumps(document) + "\n")


def _stdlib_module_names() -> Iterator[str]:
    """Public standard-library modules and their submodules, sorted, without the skipped ones."""
    pending = sorted(n for n in sys.stdlib_module_names if _wanted(n))
    while pending:
        name = pending.pop(0)
        yield name
        module = _quiet_import(name)
        if module is not None and hasattr(module, "__path__"):  # a package: queue its submodules
            subs = [f"{name}.{m.name}" for m in pkgutil.iter_modules(module.__path__)]
            pending = sorted(pending + [s for s in subs if _wanted(s)])


def _wanted(name: str) -> bool:
    """False for private modules (`_x`, `__main__`, which runs code), tests, and `SKIPPED_MODULES`."""
    return not any(part.startswith(("_", "test_")) or part in SKIPPED_MODULES for part in name.split("."))


def _quiet_import(name: str) -> ModuleType | None:
    """Import a module with stdout/stderr silenced; None when it cannot be imported on this platform."""
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), redirect_stderr(devnull):
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - ImportError, OSError on other platforms, even SystemExit
            return None


def _module_docstrings(module: ModuleType, seen: set[str]) -> Iterator[str]:
    """The module's docstring, then those of the classes, functions and methods it defines, by name."""
    yield from _new_doc(module.__name__, module.__doc__, seen)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (documented there)
        if inspect.isclass(obj):
            yield from _new_doc(f"{module.__name__}.{name}", vars(obj).get("__doc__"), seen)
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_") and not _is_dunder(member_name):
                    continue  # private; dunders stay (`__init__` often documents the arguments)
                member = getattr(member, "__func__", member)  # classmethod / staticmethod
                if inspect.isroutine(member) or isinstance(member, property):
                    yield from _new_doc(f"{module.__name__}.{name}.{member_name}", member.__doc__, seen)
        elif inspect.isroutine(obj):
            yield from _new_doc(f"{module.__name__}.{name}", obj.__doc__, seen)


def _is_dunder(name: str) -> bool:
    """True for `__name__`-style special names."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _new_doc(title: str, doc: object, seen: set[str]) -> Iterator[str]:
    """`title` and the cleaned docstring, unless it is missing, not a string, or already written."""
    if not isinstance(doc, str) or not doc.strip():
        return
    text = inspect.cleandoc(doc)
    if text in seen:
        return
    seen.add(text)
    yield f"{title}: {text}"

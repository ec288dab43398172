"""The package's import graph, read from the source (ast): folders (data/, finetune/) count as one node each, no
cycle passes through a folder, and data/ looks only down, at the few bottom modules it needs."""

from __future__ import annotations

import ast
from pathlib import Path

import encoder_train

PACKAGE = Path(encoder_train.__file__).parent
FOLDERS = ("data", "finetune")
# What data/ may import: ids and batches (batch), errors, seeds, URLs, text files and the tokenizer that
# pretokenize loads. Nothing that imports data/ itself, nor the config, the plan, devices, state or the loop.
DATA_MAY_IMPORT = {"batch", "errors", "seeds", "textfiles", "tokenizer", "urls"}


def node(module: str) -> str:
    """encoder_train.data.shards -> data/, encoder_train.config -> config."""
    parts = module.split(".")[1:]
    return f"{parts[0]}/" if parts[0] in FOLDERS and len(parts) > 1 else parts[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["encoder_train", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that a file imports, anywhere in it (in a function too)."""
    names = set()
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            names |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return {m for m in names if m in known and m != "encoder_train"}


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for module, path in known.items():
        if module == "encoder_train":
            continue
        edges.setdefault(node(module), set()).update(node(m) for m in imported(path, known))
    return {a: bs - {a} for a, bs in edges.items()}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every node that `start` imports, however indirectly."""
    seen, todo = set(), [start]
    while todo:
        for m in edges.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_no_import_cycle_passes_through_a_folder():
    edges = graph()
    for folder in FOLDERS:
        back = sorted(m for m in edges[f"{folder}/"] if f"{folder}/" in reachable(edges, m))
        assert not back, f"{folder}/ imports {back}, which import {folder}/ back"


def test_data_imports_only_the_bottom_modules_it_needs():
    edges = graph()
    assert edges["data/"] <= DATA_MAY_IMPORT, sorted(edges["data/"] - DATA_MAY_IMPORT)
    assert "data/" not in reachable(edges, "data/")
    # config.py reads URLs through urls.py, not data/store.py: the schema sits above no data module.
    assert "data/" not in reachable(edges, "config")

"""The package's shape, read from the code's own imports: no module imports one that imports it back (no circle), no
folder (data/, finetune/, ...) reaches up to a module that reaches back into it, and data/ looks only down, at the few
bottom modules it needs (test_demo checks that the trainer never imports the quickstart). Every import counts,
including those inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "encoder_train"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the encoder_train modules it imports (`from encoder_train.data import shards` names the module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph`, as the nodes along it, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def room(module: str) -> str:
    """A module's room: its folder under encoder_train (encoder_train.data.shards -> encoder_train.data), or itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_graph_is_read():
    graph = imports()
    assert "encoder_train.model" in graph["encoder_train.train"]  # the reader sees plain imports
    assert "encoder_train.errors" in graph["encoder_train.config"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_circle():
    assert find_cycle(imports()) is None


def test_no_folder_reaches_back_up():
    rooms: dict[str, set[str]] = {}
    for module, targets in imports().items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    assert find_cycle(rooms) is None


# What data/ may import: batches (batch), errors, seeds, URLs, text files and the tokenizer that pretokenize loads.
# Nothing that imports data/ itself, nor the config, the plan, devices, state or the loop.
DATA_MAY_IMPORT = {"batch", "errors", "seeds", "textfiles", "tokenizer", "urls"}


def test_data_imports_only_the_bottom_modules_it_needs():
    used = {room(t).removeprefix("encoder_train.") for m, targets in imports().items()
            if room(m) == "encoder_train.data" for t in targets if room(t) != "encoder_train.data"}
    assert used <= DATA_MAY_IMPORT, sorted(used - DATA_MAY_IMPORT)

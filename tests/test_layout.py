"""The package's layout: data flows one way, so no file or package of edgellm imports itself
back through another (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "edgellm"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """The edgellm modules `name` imports. `from pkg import sub` names the submodule `sub` (the
    package's __init__ is not what it reads); `from pkg import thing` names `pkg`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target.startswith("edgellm") and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search, three colours)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graphs():
    mods = _modules()
    files = {name: _imports(name, path, mods) for name, path in mods.items()}
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731  edgellm.compiler, edgellm.eval, ...
    packages: dict[str, set[str]] = {}
    for name, targets in files.items():
        packages.setdefault(top(name), set()).update(
            top(t) for t in targets if top(t) != top(name) and top(t) != "edgellm")
    return files, packages


def test_no_file_imports_itself_back():
    files, _ = _graphs()
    assert len(files) > 40 and "edgellm.compiler.builder" in files  # the walk found the code
    assert _cycle(files) is None, " -> ".join(_cycle(files))


def test_no_package_imports_itself_back():
    _, packages = _graphs()
    assert {"edgellm.compiler", "edgellm.runtime", "edgellm.text", "edgellm.chat"} <= set(packages)
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_the_runtime_knows_no_chat_layer_and_the_text_layer_no_runtime():
    files, _ = _graphs()
    for name, targets in files.items():
        if name.startswith(("edgellm.runtime", "edgellm.text")):
            assert not {t for t in targets if t.startswith("edgellm.chat")}, name
        if name.startswith("edgellm.text"):
            assert not {t for t in targets if t.startswith(("edgellm.runtime", "edgellm.server"))}

"""Imports inside offload_engine go one way (issue 19): no module imports, directly or through others, a module that
imports it back. Every import statement counts, wherever it sits: top level, inside a function (a lazy import is
still a dependency), under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "offload_engine"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that `name` imports -> the line of the first such import.

    `from X import y` depends on X, or only on the submodule X.y when y is one; `import a.b` on a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.append(submodule if submodule in modules else source)
        for target in targets:
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list of module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in component for b in component if b in graph[a]]
    return "; ".join(edges)


def test_the_checker_finds_circles_of_every_kind(tmp_path):
    """A top-level import one way and a function-level or TYPE_CHECKING one back is a circle; one way is not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nfrom . import b\nA = 1\n")
    (package / "b.py").write_text("def f():\n    from .c import C\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    (package / "d.py").write_text("from .a import A\nfrom . import b\n")
    modules = module_files(package)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["pkg"] == {"pkg.a": 1} and graph["pkg.a"] == {"pkg.b": 2}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    (package / "c.py").write_text("C = 1\n")
    graph["pkg.c"] = imported_modules("pkg.c", package / "c.py", modules)
    assert cycles(graph) == []


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert len(graph) > 30 and "offload_engine.loader" in graph["offload_engine"]
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(c, graph) for c in found)


def test_the_load_path_goes_one_way():
    """name -> source and config -> build: the loader imports the engine and the pre-quantized format, and
    neither of them imports the loader, the converter or the CLI."""
    graph = import_graph()
    loader = graph["offload_engine.loader"]
    assert {"offload_engine.engine", "offload_engine.prequantized", "offload_engine.checkpoint"} <= set(loader)
    for module in ("offload_engine.engine", "offload_engine.prequantized", "offload_engine.chat"):
        upward = {m for m in graph[module] if m.startswith(("offload_engine.loader", "offload_engine.convert",
                                                             "offload_engine.cli", "offload_engine.server"))}
        assert not upward, f"{module} imports {upward}"

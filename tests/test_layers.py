"""The package's layers: no module of lbtrain imports itself back through others, and the analysis (reading
finished runs) never reaches up into the run layer (training, the CLI, the pre-flight check, probes).

Imports are read from the source with `ast`, without importing anything: module-level imports, imports inside
functions and imports under `if TYPE_CHECKING:` alike. A function-level or type-only import only moves the cycle
from import time to the design: the two modules still know each other.
"""

from __future__ import annotations

import ast
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import lbtrain

# What lbtrain.analysis must never import: the layers that run training (it reads what they wrote).
RUN_LAYER = ("lbtrain.trainer", "lbtrain.cli", "lbtrain.preflight", "lbtrain.session", "lbtrain.instruments.probes")


def modules() -> dict[str, tuple[Path, bool]]:
    """{module name: (source file, is a package)} for lbtrain and every module below it. The folders are walked
    with pkgutil.iter_modules, not walk_packages: that one imports each package and silently skips one that fails
    to import, which would leave its modules out of the check."""
    out: dict[str, tuple[Path, bool]] = {}

    def walk(folder: Path, package: str) -> None:
        out[package] = (folder / "__init__.py", True)
        for info in pkgutil.iter_modules([str(folder)], package + "."):
            short = info.name.rpartition(".")[2]
            if info.ispkg:
                walk(folder / short, info.name)
            elif (folder / f"{short}.py").is_file():
                out[info.name] = (folder / f"{short}.py", False)

    walk(Path(lbtrain.__file__).parent, "lbtrain")
    return out


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _known(name: str, known: dict[str, tuple[Path, bool]]) -> str | None:
    """`name`, or its nearest enclosing lbtrain module (`lbtrain.x.attr` -> `lbtrain.x`); None outside lbtrain."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, known: dict[str, tuple[Path, bool]]) -> set[str]:
    """The lbtrain modules that module `name` imports (directly)."""
    path, is_pkg = known[name]
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        out |= {t for t in map(lambda t: _known(t, known), targets) if t and t != name}
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, known) for name in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan): each holds at least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One cycle through the component's first module, as `a -> b -> a`, for the failure message."""
    start, members = component[0], set(component)
    trail, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[trail[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back or not nxt:
            return " -> ".join([*trail, start])
        step = next((w for w in nxt if w not in seen), nxt[0])
        if step in seen:
            return " -> ".join([*trail[trail.index(step):], step])
        trail.append(step)
        seen.add(step)


def test_the_reader_sees_imports_at_every_depth():
    """The graph is not vacuous: known module-level and function-level imports are found."""
    graph = import_graph()
    assert "lbtrain.analysis.runs" in graph["lbtrain.analysis.report"]  # module level (`from ... import`)
    assert "lbtrain.checkpoint" in graph["lbtrain.analysis.interp"]  # inside a function
    assert "lbtrain.models" in graph["lbtrain.analysis.interp"]  # inside a function, a package
    assert "lbtrain.ghost_bn" in graph["lbtrain"]  # `from lbtrain import ghost_bn`: the module, not the package
    assert "lbtrain.models" in graph and "lbtrain.analysis.runs" in graph  # packages and their modules


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert _path(graph, ["a", "b", "c"]) == "a -> b -> c -> a"


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(f"  {_path(graph, c)}  (all of: {', '.join(c)})"
                                                     for c in found)


def test_analysis_never_imports_the_run_layer():
    graph = import_graph()
    analysis = [m for m in graph if m == "lbtrain.analysis" or m.startswith("lbtrain.analysis.")]
    assert {"lbtrain.analysis.runs", "lbtrain.analysis.report", "lbtrain.analysis.interp"} <= set(analysis)
    upward = {m: sorted(t for t in graph[m] if any(t == u or t.startswith(u + ".") for u in RUN_LAYER))
              for m in analysis}
    assert not {m: t for m, t in upward.items() if t}, upward


def test_pyproject_ships_every_package():
    """A package missing from pyproject's list installs nowhere (an editable install hides that: it reads the
    source tree): every package folder under lbtrain/ is listed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((Path(lbtrain.__file__).parents[1] / "pyproject.toml").read_text())["tool"]
                 ["setuptools"]["packages"])
    packages = {name for name, (_, is_pkg) in modules().items() if is_pkg}
    assert packages <= listed, sorted(packages - listed)

"""The shape of the package, read off its source with ``ast`` (nothing is imported): modules and
functions stay small, modules import each other without cycles, and no program imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unicom"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its ``__init__``)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(tree: ast.AST, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs; with ``deferred``, also those inside functions (run on use)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue  # only read by type checkers
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif deferred or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                stack.append(child)
    return found


def _imported(module: str, deferred: bool = False) -> set[str]:
    """The package's modules that importing ``module`` loads directly (parents' ``__init__`` included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in _import_nodes(ast.parse(path.read_text()), deferred):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            bases = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in bases:
            parts = name.split(".")
            # importing a.b.c runs a, a.b and a.b.c
            targets.update(".".join(parts[: i + 1]) for i in range(len(parts)) if ".".join(parts[: i + 1]) in MODULES)
    targets.discard(module)
    # a module's own package is being imported already when the module runs
    return {t for t in targets if not module.startswith(t + ".")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_modules_are_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}


def test_functions_are_small():
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name} (line {node.lineno})"] = size
    assert long == {}


@pytest.mark.parametrize("deferred", [False, True], ids=["at-import", "with-deferred-imports"])
def test_no_import_cycle(deferred):
    graph = {name: _imported(name, deferred) for name in MODULES}
    assert _cycle(graph) is None


# The `unicom` command (embed, index, search, dedup, serve) is a program too: its modules may use
# the programs' shared helpers (they import one another: the command dispatches to serve), and
# no library module imports them.
COMMAND_LINE = {"unicom.cli", "unicom.__main__", "unicom.serve.cli"}


def test_programs_import_no_program():
    helpers = {"unicom.programs.common", "unicom.programs.flags"}  # shared by the programs, not programs
    programs = {n for n in MODULES if n.startswith("unicom.programs.") and n not in helpers}
    assert programs >= {"unicom.programs.retrieval", "unicom.programs.knn", "unicom.programs.pretrain"}
    offenders = {n: sorted(_imported(n, deferred=True) & programs) for n in programs}
    assert {n: found for n, found in offenders.items() if found} == {}


def test_library_imports_no_program():
    library = {n for n in MODULES if not n.startswith("unicom.programs")} - COMMAND_LINE
    offenders = {n: sorted(t for t in _imported(n, deferred=True) if t.startswith("unicom.programs")
                           or t in COMMAND_LINE) for n in library}
    assert {n: found for n, found in offenders.items() if found} == {}


def test_the_checks_see_imports():
    """The graph is not empty by accident: known edges are found, deferred ones only when asked."""
    assert "unicom._distributed" in _imported("unicom.evaluate")
    assert "unicom.data._pipelines" in _imported("unicom.evaluate")
    assert "unicom._hub" in _imported("unicom._factory", deferred=True)
    assert "unicom._hub" not in _imported("unicom._factory")
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _declares_all(path: Path) -> bool:
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
               for node in ast.parse(path.read_text()).body)


def test_private_modules_declare_nothing():
    """A module under an underscore name is plumbing: it has no ``__all__`` to promise names."""
    private = [name for name in MODULES if any(part.startswith("_") for part in name.split("."))]
    assert len(private) > 10
    assert [name for name in private if _declares_all(MODULES[name])] == []


def test_public_names_resolve():
    import unicom

    assert sorted(unicom.__all__) == sorted(unicom._HOMES)
    assert all(not unicom._HOMES[name].startswith("..") for name in unicom.__all__)
    for name in unicom.__all__:
        assert getattr(unicom, name).__name__ == name

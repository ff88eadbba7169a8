"""The library's import graph (issue 22): no circle between its modules, counting the imports made
inside functions and the names a package exports lazily (its ``_EXPORTS`` table, aligner/lazy.py) as
imports of the module that defines them; and no module importing another module's private
(``_name``) helpers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "aligner"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def lazy_exports(package: str) -> dict[str, str]:
    """A package's ``_EXPORTS`` table: public name -> the absolute name of the defining module."""
    for node in ast.parse(MODULES[package].read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_EXPORTS":
            table = ast.literal_eval(node.value)
            return {name: f"{package}.{module}" for name, module in table.items()}
    return {}


def imported_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module ``node`` imports from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    package = parts if MODULES[module].name == "__init__.py" else parts[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def imports() -> list[tuple[str, str, str]]:
    """(importer, imported module, imported name) for every import of an aligner module, at any depth
    of the importer's code; a name that is a submodule counts as that module."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(module, a.name, "") for a in node.names if a.name in MODULES]
            elif isinstance(node, ast.ImportFrom):
                source = imported_from(module, node)
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if target in MODULES:
                        found.append((module, target, ""))
                    elif source in MODULES:
                        # A lazily exported name is an import of the module that defines it.
                        found.append((module, lazy_exports(source).get(alias.name, source), alias.name))
    return found


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{importer} imports {name} from {source}"
        for importer, source, name in imports()
        if name.startswith("_") and not name.startswith("__") and source != importer
    ]
    assert not private, private


def test_the_import_graph_has_no_circle():
    edges: dict[str, set[str]] = {}
    for importer, source, _ in imports():
        if source != importer:
            edges.setdefault(importer, set()).add(source)
    circles, state, path = [], {}, []

    def visit(module: str) -> None:
        state[module], _ = "open", path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        state[module], _ = "done", path.pop()

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert not circles, circles
    assert len(edges) > 10  # the walk did find the package's imports

"""The package's structure (DESIGN.md §2, §5): imports only point down, and only method files know method ids."""

import ast
from pathlib import Path

from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import sslhub

PACKAGE = Path(sslhub.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(path: Path) -> set[str]:
    """sslhub modules a file imports anywhere (functions included; ``if TYPE_CHECKING:`` blocks, which never run,
    excluded). ``from package import name`` counts as importing ``package.name`` when that is a module."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    """No sslhub module imports, even inside a function, a module that imports it back, directly or through others.
    The top-level package ``sslhub`` (the public facade that imports everything) is the one exception, so no other
    module may import it."""
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    importers_of_facade = sorted(name for name, targets in graph.items() if "sslhub" in targets and name != "sslhub")
    assert importers_of_facade == []
    graph = {name: targets - {"sslhub"} for name, targets in graph.items() if name != "sslhub"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def method_ids_named_in(path: Path, ids: set[str]) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ids
    ]


def test_only_method_files_name_method_ids():
    """Knowledge of a method lives in its file: no module outside ``sslhub/methods/`` has a method id as a string
    (no ``config.method == "mae"``, no table keyed by method names). transformers' own ``model_type`` names
    (``"dinov2"`` is also a transformers architecture) are what the transformers ports read, not method ids."""
    ids = set(sslhub.list_methods()) - set(CONFIG_MAPPING_NAMES)
    outside = {name: path for name, path in MODULES.items() if not name.startswith("sslhub.methods")}
    named = {name: found for name, path in outside.items() if (found := method_ids_named_in(path, ids))}
    assert named == {}

"""Two rules of the layout, checked on the source: no import cycle in app/, and nothing
outside the registry package writes the database."""

from __future__ import annotations

import ast
import re
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def _module(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the app modules it imports, lazily (inside a function) or not: a lazy import
    that breaks a cycle at load time still leaves the two modules knotted together."""
    modules = {_module(p): p for p in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycle_in_app() -> None:
    graph = _imports()
    # A package's __init__ importing its own submodules is not a cycle of ideas; drop the
    # edges from a submodule to its own package.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(
            [*visiting[visiting.index(node):], node])
        visiting.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


WRITES = re.compile(r"\.(create|insert|insert_many|save|delete_instance|delete|update|replace)\(")
MODELS = re.compile(r"\b(Product|Engine|Event|RateLimit|PortLease|IdCounter)\b")


def test_only_the_registry_writes_the_database() -> None:
    offenders = []
    for path in APP.rglob("*.py"):
        if path.is_relative_to(APP / "registry") or path.is_relative_to(APP / "refengine"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            writes_a_model = bool(MODELS.search(line) and WRITES.search(line))
            raw_sql = "execute_sql(" in line and "SELECT 1" not in line
            if writes_a_model or raw_sql:
                offenders.append(f"{path.relative_to(APP.parent)}:{number}: {line.strip()}")
    assert offenders == []

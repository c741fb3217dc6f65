"""Rules of the layout, checked on the source: no import cycle in app/, nothing outside the
registry package writes the database, and every error the API or the client can show is in
the one table of codes (app.errors.CODES)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from app import errors
from app.client import _errors as client_errors

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


# Exceptions that never reach the API or the client, and why: each is caught and turned into
# an error of the table, or belongs to start-up and the CLI, before any request is served.
NOT_ANSWERED = {
    "app.config.ConfigError": "start-up configuration: the CLI prints it, the server never starts",
    "app.statedir.NoDatabase": "the CLI's: no state dir to work on",
    "app.registry.products.ProductExists": "app.products turns it into ProductError (400)",
    "app.registry.products.ProductInUse": "app.products turns it into ProductError (400)",
    "app.drivers._nomad_volumes.VolumeGone": "the Nomad driver's own signal, caught inside it",
    "app.drivers._nomad_api.VariableConflict": "the Nomad driver's own signal, caught inside it",
    "app.drivers._health._Closed": "the health checker's own signal, caught inside it",
    "app.upgrades._NotUp": "carries a DriverError out of a helper; answered as UpgradeFailed",
}


def _app_modules() -> list[str]:
    names = []
    for path in sorted(APP.rglob("*.py")):
        name = _module(path)
        if path.is_relative_to(APP / "refengine") or path.name == "__main__.py":
            continue  # the refengine is a program of its own, with errors of its own
        names.append(name)
    return names


def _exception_classes(module_names: list[str]) -> list[type[BaseException]]:
    found = []
    for name in module_names:
        module = importlib.import_module(name)
        found += [c for c in vars(module).values() if inspect.isclass(c)
                  and issubclass(c, BaseException) and c.__module__ == name]
    return found


def _strays(classes: list[type[BaseException]]) -> list[str]:
    """The classes that are neither an error of the table nor a known internal signal."""
    strays = []
    for cls in classes:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if issubclass(cls, errors.DomainError):
            ok = cls.code in errors.BY_CODE
        elif issubclass(cls, client_errors.OrchestratorError):
            ok = cls.CODE is None or cls.CODE in errors.BY_CODE or cls is client_errors.UnexpectedResponse
        else:
            ok = where in NOT_ANSWERED
        if not ok:
            strays.append(where)
    return strays


def test_every_error_class_in_app_is_in_the_table() -> None:
    classes = _exception_classes(_app_modules())
    assert len(classes) > 40  # the scan does see the trees
    assert _strays(classes) == []
    names = {f"{c.__module__}.{c.__qualname__}" for c in classes}
    assert set(NOT_ANSWERED) <= names  # no stale excuse


def test_a_stray_error_class_fails_the_rule() -> None:
    class Stray(Exception):
        pass

    class StrayClient(client_errors.OrchestratorError):
        pass

    StrayClient.CODE = "NOT_IN_THE_TABLE"
    for cls in (Stray, StrayClient):
        cls.__module__ = "app.somewhere"
    assert _strays([Stray, StrayClient, errors.PortExhaustion]) == [
        "app.somewhere.test_a_stray_error_class_fails_the_rule.<locals>.Stray",
        "app.somewhere.test_a_stray_error_class_fails_the_rule.<locals>.StrayClient"]
    with pytest.raises(TypeError, match=r"not in app\.errors\.CODES"):
        type("Coded", (errors.DomainError,), {"code": "NOT_IN_THE_TABLE"})
    with pytest.raises(TypeError, match="not the table's"):
        type("PortExhausted", (client_errors.OrchestratorError,), {"CODE": "PORT_EXHAUSTION"})


def test_each_code_has_one_class_of_its_name_on_the_server_and_in_the_client() -> None:
    for entry in errors.CODES:
        # INTERNAL is the root's: an error that is nothing more precise is a bug.
        server = errors.DomainError if entry.code == "INTERNAL" else getattr(errors, entry.class_name)
        client = getattr(client_errors, entry.class_name)
        assert entry.code == server.code and entry.code == client.CODE, entry
        assert client_errors.ERRORS_BY_CODE[entry.code] is client
    assert set(client_errors.ERRORS_BY_CODE) == set(errors.BY_CODE)


def test_the_table_of_codes_imports_only_the_standard_library() -> None:
    """The client imports app.errors, and the client installs with httpx alone."""
    import sys

    tree = ast.parse((APP / "errors.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported

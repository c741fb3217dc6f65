"""The rules of the layout, checked on the source: no import cycle in app/; nothing outside
the registry package writes the database; drivers never import the registry; subscriptions to
the registry are made at start-up, in one place; the CLI does not query a model; only the
operations table (app.operations) runs an operation; every error the API or the client can
show is in the one table of codes (app.errors.CODES)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import errors
from app.client import _errors as client_errors

APP = Path(__file__).resolve().parents[2] / "app"


def _module(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, str]:
    """Module name -> its source, for every module of app/."""
    return {_module(p): p.read_text() for p in APP.rglob("*.py")}


def _imported(tree: ast.AST) -> set[str]:
    """Every dotted name a module imports, lazily (inside a function) or not, with each name
    it takes from a module (`from app.x import y` gives app.x and app.x.y)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _imports(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Module -> the app modules it imports, lazily or not: a lazy import that breaks a cycle
    at load time still leaves the two modules knotted together."""
    sources = _sources() if sources is None else sources
    return {name: {m for m in _imported(ast.parse(text)) if m in sources and m != name}
            for name, text in sources.items()}


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


def _model_names() -> list[str]:
    """Every table class of app/registry/models.py: the subclasses of peewee's Model there,
    directly or through another class of the module."""
    tree = ast.parse((APP / "registry" / "models.py").read_text())
    models = {"Model"}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    for _ in classes:  # to a fixed point: a base may be defined after its subclass
        for node in classes:
            bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
            if bases & models:
                models.add(node.name)
    return sorted(models - {"Model"})


MODEL_NAMES = _model_names()
WRITES = re.compile(r"\.(create|insert|insert_many|save|delete_instance|delete|update|replace)\(")
MODELS = re.compile(r"\b(" + "|".join(MODEL_NAMES) + r")\b")


def test_every_model_is_covered() -> None:
    """The rules below know every table, read from the models module, not from a list."""
    assert {"Product", "Engine", "Event", "RateLimit", "PortLease", "IdCounter", "ShardLease",
            "Replica", "Rollout", "RolloutTarget"} <= set(MODEL_NAMES)


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


def _drivers_importing_the_registry(sources: dict[str, str]) -> list[str]:
    graph = _imports(sources)
    return sorted(f"{name} imports {dep}" for name, deps in graph.items()
                  if name == "app.drivers" or name.startswith("app.drivers.")
                  for dep in deps if dep == "app.registry" or dep.startswith("app.registry."))


def test_drivers_never_import_the_registry() -> None:
    """A driver runs engines; what it needs of the database (the local driver's port pool)
    it is given through an interface."""
    assert _drivers_importing_the_registry(_sources()) == []


def _subscriptions(sources: dict[str, str]) -> list[str]:
    """Where each call to the registry's `subscribe` is: "module:function" ("module:<top>"
    for one made at import time)."""
    found = []
    for name, text in sources.items():
        tree = ast.parse(text)
        holders, direct = _registry_aliases(tree)
        for function, call in _calls(tree):
            func = call.func
            if (isinstance(func, ast.Name) and func.id in direct) or (
                    isinstance(func, ast.Attribute) and func.attr == "subscribe"
                    and isinstance(func.value, ast.Name) and func.value.id in holders):
                found.append(f"{name}:{function}")
    return sorted(found)


def _registry_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """The names a module binds to the registry (or its events module), and to its
    `subscribe` function."""
    holders, direct = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("app", "app.registry"):
            for alias in node.names:
                if alias.name in ("registry", "events"):
                    holders.add(alias.asname or alias.name)
        if isinstance(node, ast.ImportFrom) and node.module in ("app.registry", "app.registry.events"):
            direct |= {a.asname or a.name for a in node.names if a.name == "subscribe"}
        if isinstance(node, ast.Import):
            holders |= {a.asname for a in node.names
                        if a.asname and a.name in ("app.registry", "app.registry.events")}
    return holders, direct


def _calls(tree: ast.Module) -> Iterator[tuple[str, ast.Call]]:
    """Every call, with the top-level function or class it is in ("<top>": at import time)."""
    for statement in tree.body:
        where = statement.name if isinstance(
            statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else "<top>"
        for node in ast.walk(statement):
            if isinstance(node, ast.Call):
                yield where, node


def test_subscriptions_are_made_at_start_up_in_one_place() -> None:
    """Metrics and logs hear of transitions because the service's start-up subscribes them,
    not because something imported them."""
    assert set(_subscriptions(_sources())) == {"app.api.app:subscribe_observers"}


MODELS_MODULE = "app.registry.models"


def _cli_model_uses(sources: dict[str, str]) -> list[str]:
    """Each place an app/cli*.py module imports the models module or a model class, or reaches
    a model class through the registry."""
    found = []
    for name, text in sources.items():
        if not name.startswith("app.cli"):
            continue
        tree = ast.parse(text)
        holders, _ = _registry_aliases(tree)
        for dotted in _imported(tree):
            module, _, last = dotted.rpartition(".")
            if dotted.startswith(MODELS_MODULE) or (
                    module.startswith("app.registry") and last in MODEL_NAMES):
                found.append(f"{name} imports {dotted}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in MODEL_NAMES and \
                    isinstance(node.value, ast.Name) and node.value.id in holders:
                found.append(f"{name}:{node.lineno} uses registry.{node.attr}")
    return sorted(found)


def test_the_cli_does_not_query_a_model() -> None:
    """The CLI goes through the same operations and registry functions as the API."""
    assert _cli_model_uses(_sources()) == []


RUNS = {"run", "create", "run_without_row"}


def _runner_calls(sources: dict[str, str]) -> list[str]:
    """Each call of the runner's entry points outside app.operations (`runner.run(...)`,
    `self.runner.create(...)`): an operation run around the table's policy."""
    found = []
    for name, text in sources.items():
        if name == "app.operations":
            continue
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in RUNS):
                continue
            holder = node.func.value
            if (isinstance(holder, ast.Name) and holder.id == "runner") or (
                    isinstance(holder, ast.Attribute) and holder.attr == "runner"):
                found.append(f"{name}:{node.lineno}")
    return sorted(found)


def test_only_the_operations_table_runs_an_operation() -> None:
    """One way to run an operation: Engines.run, which reads the operation's policy."""
    assert _runner_calls(_sources()) == []


@pytest.mark.parametrize("module, source, rule", [
    ("app.drivers.sneaky", "from app.registry import ports\n", _drivers_importing_the_registry),
    ("app.drivers.sneaky", "def f():\n    import app.registry.models\n",
     _drivers_importing_the_registry),
    ("app.sneaky", "from app import registry\nregistry.subscribe(print)\n", _subscriptions),
    ("app.sneaky", "from app.registry import subscribe\ndef f():\n    subscribe(print)\n",
     _subscriptions),
    ("app.cli_sneaky", "from app.registry.models import Engine\n", _cli_model_uses),
    ("app.cli_sneaky", "from app.registry import Rollout\n", _cli_model_uses),
    ("app.cli_sneaky", "from app import registry\nregistry.RolloutTarget.select()\n",
     _cli_model_uses),
    ("app.sneaky", "async def f(engines):\n    await engines.runner.run('stop', (1, 'u'), g)\n",
     _runner_calls),
])
def test_each_layer_rule_catches_a_violation(module: str, source: str, rule: object) -> None:
    """A module injected with one violation is found by the rule it breaks."""
    sources = {"app.registry": "", "app.registry.ports": "", "app.registry.models": "",
               "app.drivers": "", module: source}
    assert callable(rule) and rule(sources) != []
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
    "app.cli_down._Stopped": "a stop signal ending `orch serve` quietly, caught around it",
    "app.api.edge._Stop": "stops the HTTP parser from its callback once the edge has refused the request",
    "app.snapshots.sidecar_http.Refused": "the snapshot sidecar's own answer (a program of its own)",
    "app.snapshots.sidecar_http.Stopping": "the sidecar's own signal: SIGTERM leaves a request unanswered",
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

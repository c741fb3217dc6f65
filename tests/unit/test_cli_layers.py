"""The CLI's layer: its modules read the database through the registry's read functions and
change state only through the operations (the API's handlers, app/products.py); they never
query a model nor write a row themselves."""

from __future__ import annotations

import ast
import inspect

import peewee as pw

from app.registry import models
from tests.harness import ROOT

# What a CLI module may call in app.registry: connecting, reads, and the port pool it hands the
# driver as the server does.
READS = {"connect", "ports", "all_products", "product_by_name", "product_name", "list_engines",
         "events_for", "recent_events", "engine_counts",
         "rollouts.reload_rollout", "rollouts.list_rollouts", "rollouts.summary"}
MODELS = {name for name, cls in inspect.getmembers(models, inspect.isclass)
          if issubclass(cls, pw.Model) and cls is not pw.Model}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def problems(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("app.registry"):
            names = {a.name for a in node.names}
            if node.module != "app.registry" or names & MODELS or names - {"EngineRow"}:
                found.append(f"from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("app.registry")]
        elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            name = _dotted(node)
            if name and name.startswith("registry.") and name.count(".") == 1 + name.startswith(
                    "registry.rollouts."):
                used = name.removeprefix("registry.")
                if used != "rollouts" and used not in READS:
                    found.append(name)
    return sorted(set(found))


def test_cli_modules_only_read_through_the_registrys_functions() -> None:
    modules = sorted((ROOT / "app").glob("cli*.py"))
    assert len(modules) >= 5
    assert {p.name: problems(p.read_text()) for p in modules} == {p.name: [] for p in modules}


def test_the_check_catches_a_model_query_and_a_write() -> None:
    assert {"Engine", "Product", "Event", "Rollout"} <= MODELS
    assert problems("from app.registry.models import Rollout") == [
        "from app.registry.models import Rollout"]
    assert problems("from app.registry import Product") == ["from app.registry import Product"]
    assert problems("rows = registry.Product.select()") == ["registry.Product"]
    assert problems("registry.rollouts.set_status(r, ('running',), 'paused')") == [
        "registry.rollouts.set_status"]
    assert problems("registry.transition(row, 'stop')") == ["registry.transition"]
    assert problems("registry.rollouts.summary(1); registry.list_engines()") == []

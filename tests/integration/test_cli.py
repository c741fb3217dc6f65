"""`orch` commands against a real database (and a real server where they need engines)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness import ROOT, Orchestrator


def test_products_lifecycle(orch: Orchestrator) -> None:
    created = json.loads(orch.cli("products", "create", "shop", "--max-engines", "2",
                                  "--rate-limit-rpm", "30").stdout)
    assert created["platform_key"].startswith("orch_pk_") and created["max_engines"] == 2
    listed = json.loads(orch.cli("products", "list").stdout)
    assert {p["name"] for p in listed} == {"acme", "shop"}
    updated = json.loads(orch.cli("products", "update", "shop", "--max-engines", "5").stdout)
    assert updated["max_engines"] == 5 and updated["rate_limit_rpm"] == 30
    rotated = json.loads(orch.cli("products", "rotate-key", "shop").stdout)["platform_key"]
    assert rotated != created["platform_key"]
    deleted = json.loads(orch.cli("products", "delete", "shop").stdout)
    assert deleted == {"name": "shop", "deleted": True}


def test_bad_input_is_one_clear_line(orch: Orchestrator) -> None:
    for args, needle in [(("products", "create", "Bad Name"), "product name"),
                         (("products", "create", "acme"), "already exists"),
                         (("products", "delete", "nope"), "no product"),
                         (("products", "update", "acme", "--max-engines", "-1"), "max_engines")]:
        result = orch.cli(*args, check=False)
        assert result.returncode != 0 and needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_bad_configuration_stops_start_up_with_one_line(orch: Orchestrator) -> None:
    env = {**orch.env, "ORCH_BOOT_TIMEOUT_S": "soon"}
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "orch: ORCH_BOOT_TIMEOUT_S='soon' is invalid: must be a number"
    bad_secret = {**orch.env, "ORCH_SECRET_KEY": "not-a-fernet-key"}
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=bad_secret, cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "ORCH_SECRET_KEY is invalid" in result.stderr
    assert "not-a-fernet-key" not in result.stderr  # a secret is never echoed


def test_engines_audit_and_reconcile(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "cli-user"})
    api.post("/engines/cli-user/stop")
    engines = json.loads(orch.cli("engines", "list", "--product", "acme").stdout)
    assert [(e["user_id"], e["status"]) for e in engines] == [("cli-user", "stopped")]
    audit = json.loads(orch.cli("audit", "--product", "acme", "--user", "cli-user").stdout)
    assert [e["event"] for e in audit][:2] == ["stopped", "stop"]
    # a product with engines cannot be deleted
    refused = orch.cli("products", "delete", "acme", check=False)
    assert refused.returncode == 1 and "destroy them first" in refused.stderr
    passed = json.loads(orch.cli("reconcile").stdout)
    assert passed["probed"] == 0  # nothing running; the pass itself ran


def test_products_ensure_keeps_the_demo_key(orch: Orchestrator) -> None:
    first = orch.cli("products", "ensure", "demo").stdout
    second = orch.cli("products", "ensure", "demo").stdout
    assert "ORCH_PLATFORM_KEY=orch_pk_" in first and first == second

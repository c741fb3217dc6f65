"""`orch` commands against a real database (and a real server where they need engines)."""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import ROOT, Orchestrator, free_port, wait_for


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


# ---- the operator's first hour -----------------------------------------------------------


def orch_in(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def bare_env(orch: Orchestrator) -> dict[str, str]:
    """The harness's environment without the state dir and database variables: the defaults."""
    return {k: v for k, v in orch.env.items() if k not in ("ORCH_STATE_DIR", "ORCH_DATABASE_URL")}


def test_make_run_the_cli_and_serve_share_one_database(orch: Orchestrator, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    env = bare_env(orch)
    # `make run`'s first step, then a CLI command and a server, all with the defaults
    ensured = orch_in(project, env, "products", "ensure", "demo")
    assert ensured.returncode == 0, ensured.stderr
    key = ensured.stdout.split("ORCH_PLATFORM_KEY=")[1].split()[0]
    listed = orch_in(project, env, "products", "list", "--json")
    assert [p["name"] for p in json.loads(listed.stdout)] == ["demo"]
    state = project / ".orch"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in [state, *state.iterdir()]} == {
        ".orch": "0o700", "demo.platform-key": "0o600", "orch.db": "0o600"}
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                  env=env, cwd=project, stdout=log, stderr=subprocess.STDOUT)
    try:
        def answered() -> int | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/engines", trust_env=False,
                                 headers={"X-Platform-Key": key}, timeout=1).status_code
            except httpx.HTTPError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                return None
        assert wait_for(answered, timeout=20, what="orch serve") == 200  # it knows demo's key
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_read_only_commands_never_make_an_empty_database(orch: Orchestrator, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (("products", "list"), ("engines", "list"), ("audit",),
                 ("products", "rotate-key", "acme")):
        result = orch_in(elsewhere, bare_env(orch), *args)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("orch: no database at ")
        assert len(result.stderr.strip().splitlines()) == 1
    assert list(elsewhere.iterdir()) == []


def test_usage_errors_are_one_line_exit_2_and_change_nothing(orch: Orchestrator) -> None:
    before = orch.cli("products", "list", "--json").stdout
    for args, needle in [
        (("engines", "list", "--status", "bogus"), "invalid choice: 'bogus'"),
        (("audit", "--limit", "-1"), "--limit must be from 1"),
        (("audit", "--limit", "0"), "--limit must be from 1"),
        (("audit", "--limit", "many"), "whole number"),
        (("audit", "--user", "carol"), "--user needs --product"),
        (("products", "update", "acme"), "nothing to change"),
        (("products", "update", "acme", "--rate-limit-rpm", "0"), "rate_limit_rpm"),
        (("products", "create", "shop", "--max-engines", "lots"), "max_engines"),
        (("products", "frobnicate"), "invalid choice"),
        (("rollout", "start", "acme", "ref-2", "--batch-size", "0"), "INVALID_REQUEST: body: "),
        (("engines", "upgrade", "acme", "u", "bad\tversion"), "INVALID_REQUEST: "),
    ]:
        result = orch.cli(*args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("orch: ") and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert orch.cli("products", "list", "--json").stdout == before


def test_audit_user_with_product_is_that_users_trail(orch: Orchestrator) -> None:
    api = orch.client("acme")
    for user in ("carol", "dave"):
        api.post("/engines/provision", json={"user_id": user})
    trail = json.loads(orch.cli("audit", "--product", "acme", "--user", "carol").stdout)
    assert trail and {e["user_id"] for e in trail} == {"carol"}
    one = json.loads(orch.cli("audit", "--product", "acme", "--limit", "1").stdout)
    assert len(one) == 1


def test_every_option_has_help() -> None:
    from app.cli import _parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(_parser(), "orch")
    assert missing == []


def test_a_closed_pipe_ends_quietly(orch: Orchestrator) -> None:
    rows = [(1, f"user-{i}", "e-acme-x", 1_700_000_000.0 + i, "admit", None, None, None, None)
            for i in range(3000)]  # a long trail: far more than a pipe's buffer
    conn = orch.db()
    conn.executemany("INSERT INTO event (product_id, user_id, engine_name, at, event, from_status,"
                     " to_status, reason, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "audit", "--limit", "3000"],
                            env=orch.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""


def test_tables_at_a_terminal_json_for_scripts(orch: Orchestrator) -> None:
    def at_terminal(*args: str) -> str:
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=orch.env, cwd=ROOT,
                                stdout=slave, stderr=subprocess.STDOUT)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.wait(timeout=60) == 0
        return b"".join(chunks).decode()

    table = at_terminal("products", "list").splitlines()
    assert table[0].split() == ["NAME", "MAX_ENGINES", "RATE_LIMIT_RPM", "ENGINES", "WARM_POOL", "WARM"]
    assert table[1].split()[0] == "acme"
    assert json.loads(at_terminal("products", "list", "--json"))[0]["name"] == "acme"
    assert json.loads(orch.cli("products", "list").stdout)[0]["name"] == "acme"  # a pipe
    orch.cli("rollout", "start", "acme", "ref-2")
    rollouts = at_terminal("rollout", "list", "acme").splitlines()
    assert rollouts[0].split()[:3] == ["ID", "STATUS", "TO_VERSION"], rollouts
    assert rollouts[1].split()[0] == "1"
    assert json.loads(orch.cli("rollout", "list", "acme").stdout)[0]["to_version"] == "ref-2"
    assert at_terminal("engines", "list").splitlines() == ["(none)"]

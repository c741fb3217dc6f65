"""The README's commands as a new operator runs them from a fresh clone (issue 12), where a
test can: without the Makefile's variables, with the defaults only."""

from __future__ import annotations

import json
import os
import pwd
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import reap_zombies
from tests.harness import ROOT, SYSTEM_PYTHON, free_port, free_port_range, passable_tmp, wait_for


def reachable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [*path.parents, path] if p.is_dir())


@pytest.fixture
def project() -> Iterator[Path]:
    """A directory to run `orch` from, that engines run as `nobody` can pass through."""
    with passable_tmp("orch-readme-") as base:
        if not reachable_by_others(ROOT / "app" / "refengine"):
            pytest.skip(f"{ROOT} is not reachable by other users: engines could not run from it")
        yield base


def operator_env() -> dict[str, str]:
    """An operator's shell: none of our variables (not even the Makefile's ORCH_ENGINE_CMD),
    only a port range of this test worker's own, so parallel tests never share a port."""
    low, high = free_port_range(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "NOMAD_", "CONSUL_"))}
    return {**env, "ORCH_PORT_RANGE": f"{low}-{high}", "PYTHONPATH": str(ROOT), "NO_PROXY": "*"}


def orch(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def engine_pids(state: Path) -> list[int]:
    conn = sqlite3.connect(state / "orch.db", timeout=10)
    try:
        rows = conn.execute("SELECT driver_state FROM engine").fetchall()
    finally:
        conn.close()
    return [json.loads(r[0]).get("pid") for r in rows if json.loads(r[0]).get("pid")]


def test_as_root_serve_and_the_cli_run_engines_as_nobody_without_the_makefile(project: Path) -> None:
    """`make run` gives a root orchestrator an engine command `nobody` can run; `orch serve`,
    `orch engines upgrade` and `orch reconcile` run from the same directory without it used
    to stop at once ("engines run as uid 65534 cannot reach /root/.pyenv/...")."""
    env = operator_env()
    ensured = orch(project, env, "products", "ensure", "demo")
    assert ensured.returncode == 0, ensured.stderr
    key = ensured.stdout.split("ORCH_PLATFORM_KEY=")[1].split()[0]
    port = free_port()
    log = project / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                  cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-Platform-Key": key},
                       trust_env=False, timeout=60)
    try:
        def up() -> bool:
            assert server.poll() is None, log.read_text()[-2000:]
            try:
                return api.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout=30, what="orch serve")
        made = api.post("/engines/provision", json={"user_id": "alice"})
        assert made.status_code == 200, made.text
        (pid,) = engine_pids(project / ".orch")
        uid = os.stat(f"/proc/{pid}").st_uid
        assert uid == pwd.getpwnam("nobody").pw_uid
        bearer = {"Authorization": f"Bearer {made.json()['api_key']}"}
        put = httpx.put(f"{made.json()['url']}/v1/memory/colour", content=b"blue",
                        headers=bearer, trust_env=False)
        assert put.status_code < 300, put.text

        upgraded = orch(project, env, "engines", "upgrade", "demo", "alice", "ref-2")
        assert upgraded.returncode == 0, upgraded.stderr
        assert json.loads(upgraded.stdout)["engine_version"] == "ref-2"
        url = api.get("/engines/alice").json()["url"]
        kept = httpx.get(f"{url}/v1/memory/colour", headers=bearer, trust_env=False)
        assert kept.status_code == 200 and kept.content == b"blue"  # the brain came along

        passed = orch(project, env, "reconcile")
        assert passed.returncode == 0, passed.stderr
        assert api.delete("/engines/alice").status_code == 200
    finally:
        api.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for pid in engine_pids(project / ".orch"):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        reap_zombies()  # engines orphaned by the server come back to this subreaper


def test_an_engine_command_or_user_given_is_kept(project: Path) -> None:
    """The default applies only when nothing is said: ORCH_ENGINE_CMD or ORCH_ENGINE_USER win."""
    from app.cli import _reachable_engine_cmd
    from app.config import Settings

    default = _reachable_engine_cmd(Settings())
    assert default.engine_cmd == (str(SYSTEM_PYTHON), str(ROOT / "app" / "refengine"))
    for given in (Settings(engine_cmd=("/bin/engine",)), Settings(engine_user="root"),
                  Settings(driver="nomad")):
        assert _reachable_engine_cmd(given) == given

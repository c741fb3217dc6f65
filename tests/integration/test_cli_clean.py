"""`make clean` stops the server and the engines of the state dir (`orch down`) before it
removes anything, and removes nothing when they cannot be stopped: the project's own Makefile,
run in a scratch project whose `.orch` holds a real server and a real engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from app.drivers import _process
from tests.harness import ROOT, Orchestrator, wait_for


def _make_clean(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "clean", "VENV=venv"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def _orch_is(project: Path, script: str) -> None:
    orch = project / "venv" / "bin" / "orch"
    orch.parent.mkdir(parents=True, exist_ok=True)
    orch.write_text(f"#!/bin/sh\n{script}\n")
    orch.chmod(0o755)


def test_make_clean_stops_engines_before_removing_anything(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "Makefile", project / "Makefile")
    state = project / ".orch"
    orch = Orchestrator(tmp_path, env={"ORCH_STATE_DIR": str(state),
                                       "ORCH_DATABASE_URL": f"sqlite:///{state / 'orch.db'}"})
    orch.state_dir = state
    try:
        orch.start()
        orch.product("acme")
        orch.client("acme").post("/engines/provision", json={"user_id": "u"}).raise_for_status()
        (engine,) = orch.engine_pids()
        server = orch.proc
        assert server is not None

        _orch_is(project, 'echo "orch: cannot stop them" >&2; exit 5')
        refused = _make_clean(project, orch.env)
        assert refused.returncode != 0 and "nothing removed" in refused.stdout + refused.stderr
        assert state.is_dir() and server.poll() is None
        assert _process.status(engine, None) != "dead"

        _orch_is(project, f'exec "{sys.executable}" -m app.cli "$@"')
        cleaned = _make_clean(project, orch.env)
        assert cleaned.returncode == 0, cleaned.stderr
        assert server.wait(timeout=30) == 0
        wait_for(lambda: _process.status(engine, None) == "dead", timeout=10, what="the engine ended")
        assert sorted(p.name for p in project.iterdir()) == ["Makefile"]
    finally:
        orch.close()

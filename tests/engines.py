"""Looking at engines from the outside: their processes, logs and brains."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import reap_zombies
from tests.harness import Orchestrator


def proc_state(pid: int) -> str:
    """'running', 'paused' (SIGSTOPped) or 'gone' (absent or a zombie)."""
    reap_zombies()
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    code = raw[raw.rindex(")") + 2:].split()[0]
    if code in ("Z", "X"):
        return "gone"
    return "paused" if code in ("T", "t") else "running"


def engine_name(orch: Orchestrator, user_id: str) -> str:
    return orch.rows("SELECT name FROM engine WHERE user_id = ?", user_id)[0][0]


def brain_dir(orch: Orchestrator, user_id: str) -> Path:
    return orch.state_dir / "brains" / engine_name(orch, user_id)


def engine_log(orch: Orchestrator, user_id: str) -> str:
    return (orch.state_dir / "run" / engine_name(orch, user_id) / "engine.log").read_text()

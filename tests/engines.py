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
    if orch.driver == "nomad":  # the host volume's directory
        import json

        state = orch.rows("SELECT driver_state FROM engine WHERE user_id = ?", user_id)[0][0]
        return Path(json.loads(state)["volume_path"])
    return orch.state_dir / "brains" / engine_name(orch, user_id)


def engine_log(orch: Orchestrator, user_id: str) -> str:
    if orch.driver == "nomad":  # through Nomad's log API
        from tests.scheduler import task_log

        return task_log(orch.env["NOMAD_ADDR"], engine_name(orch, user_id))
    return (orch.state_dir / "run" / engine_name(orch, user_id) / "engine.log").read_text()


def nothing_left(orch: Orchestrator) -> dict[str, list]:
    """What the driver still holds for engines: {} when nothing (no row is checked here)."""
    if orch.driver == "nomad":
        from tests.scheduler import leftovers

        return {k: v for k, v in leftovers(orch.env["NOMAD_ADDR"]).items() if v}
    left = {"port_leases": orch.rows("SELECT * FROM port_lease"),
            "processes": list(engine_processes(orch).items())}
    return {k: v for k, v in left.items() if v}


def engine_processes(orch: Orchestrator) -> dict[str, list[int]]:
    """Every live engine process of this orchestrator, by engine name, found from /proc."""
    from app.drivers._process import engines_under

    reap_zombies()
    return engines_under((orch.state_dir / "brains").resolve())


def assert_consistent(orch: Orchestrator) -> None:
    """Registry and machine agree: one process per running/sleeping row and none elsewhere,
    a brain directory and a port per row and none without one."""
    import json

    rows = {name: (status, json.loads(state or "{}")) for name, status, state in
            orch.rows("SELECT name, status, driver_state FROM engine")}
    processes = engine_processes(orch)
    for name, pids in processes.items():
        assert name in rows, f"engine process {pids} of {name} has no row"
        assert len(pids) == 1, f"{name} has {len(pids)} processes"
        assert rows[name][0] in ("running", "sleeping"), f"{name} runs but is {rows[name][0]}"
        assert rows[name][1].get("pid") == pids[0], f"{name}: row and process disagree"
    for name, (status, _) in rows.items():
        if status in ("running", "sleeping"):
            assert name in processes, f"{name} is {status} but has no process"
    brains = {p.name for p in (orch.state_dir / "brains").iterdir()} if (orch.state_dir / "brains").exists() else set()
    assert brains == set(rows), f"brains {brains} vs rows {set(rows)}"
    ports = {name for (name,) in orch.rows("SELECT engine_name FROM port_lease")}
    assert ports == set(rows), f"port leases {ports} vs rows {set(rows)}"
